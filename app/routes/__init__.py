"""HTTP routers, one per resource; app/main.py includes them."""
