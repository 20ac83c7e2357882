"""Other libraries' weights -> petvit's ViT (and the convnet teachers): every way a checkpoint comes in.

pretrained.py  torchvision's ImageNet ViTs (its weights API and hub cache)
hf.py          transformers ViT / DeiT          timm_vit.py   timm ViT / DeiT / DINOv2
clip.py        CLIP image towers                dinov2.py     DINOv2 backbones (transformers)
zero_shot.py   a CLIP text tower as a classification head (`petvit import --zero-shot`)
hub.py         `petvit import SOURCE`: a hub-layout folder or hf-hub:ORG/NAME, to an artifact
checkpoints.py what the converters share (Converted, refusals by name, qkv stacking, position resampling)
teachers.py    torchvision convnets as distillation teachers, and their checkpoints

Each converter is exact: the tests compare its logits with the source library's own module at random init.
"""
