"""petvit's HTTP service and command line."""
