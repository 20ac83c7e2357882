"""A fake Oxford-IIIT Pet tree in the dataset's exact on-disk layout, small enough to train on in a test.

    <root>/oxford-iiit-pet/images/<file_prefix>_<n>.jpg
    <root>/oxford-iiit-pet/annotations/list.txt      ('#' header lines, then "Image CLASS-ID SPECIES BREED-ID")
    <root>/oxford-iiit-pet/annotations/trainval.txt  (same rows, no header)
    <root>/oxford-iiit-pet/annotations/test.txt
    <root>/oxford-iiit-pet/annotations/trimaps/<file_prefix>_<n>.png  (8-bit greyscale: 1 pet, 2 background,
                                                                        3 boundary, as the real trimaps)

CLASS-ID is 1..37 in torchvision's class order, SPECIES 1 = cat / 2 = dog, BREED-ID counts within the species
(cats 1..12, dogs 1..25), as in the real list.txt. Each breed gets its own colour and stripe direction, so a
model can learn the fixture and an evaluation has something to measure. Each image's "pet" is an ellipse whose
place and size vary with the image (`pet_trimap`); paint_pets=True also paints it into the picture, white, so a
test can see that image and mask went through the same geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from model.labels import BREEDS

LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-12:Cat 1-25:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)


def breed_image(class_index: int, n: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A width x height RGB picture whose colour and stripes identify the breed, with per-image noise."""
    rng = np.random.default_rng(1000 * class_index + n)
    w, h = size
    hue = np.array([(class_index * 53) % 256, (class_index * 97 + 80) % 256, (class_index * 151 + 160) % 256])
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = ((xx if class_index % 2 else yy) // 4) % 2  # (h, w) in {0, 1}
    pixels = hue[None, None, :] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def pet_trimap(class_index: int, n: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """(height, width) uint8 trimap: an ellipse of pet (1) ringed by a 1-2 px boundary (3), on background (2)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    cx, cy = w * (0.3 + 0.1 * (n % 4)), h * (0.4 + 0.05 * (class_index % 3))
    rx, ry = w * (0.18 + 0.02 * (n % 3)), h * 0.3
    radius = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)  # 1 on the ellipse's edge
    trimap = np.full((h, w), 2, dtype=np.uint8)
    trimap[radius <= 1.25] = 3
    trimap[radius <= 1.0] = 1
    return trimap


def make_pets_tree(
    root: str | Path, trainval_per_class: int = 4, test_per_class: int = 2, paint_pets: bool = False
) -> Path:
    """Write the fixture under root (returned); pass root as --data-dir / OxfordIIITPet(root=...)."""
    root = Path(root)
    base = root / "oxford-iiit-pet"
    images, anns = base / "images", base / "annotations"
    images.mkdir(parents=True, exist_ok=True)
    (anns / "trimaps").mkdir(parents=True, exist_ok=True)
    species_counter = {"cat": 0, "dog": 0}
    rows: dict[str, list[str]] = {"trainval": [], "test": []}
    for breed in BREEDS:
        species_counter[breed.species] += 1
        species_id = 1 if breed.species == "cat" else 2
        for n in range(1, trainval_per_class + test_per_class + 1):
            image_id = f"{breed.file_prefix}_{n}"
            picture, trimap = breed_image(breed.index, n), pet_trimap(breed.index, n)
            if paint_pets:
                pixels = np.asarray(picture).copy()
                pixels[trimap == 1] = 255
                picture = Image.fromarray(pixels)
            picture.save(images / f"{image_id}.jpg", quality=95)
            Image.fromarray(trimap, "L").save(anns / "trimaps" / f"{image_id}.png")
            split = "trainval" if n <= trainval_per_class else "test"
            rows[split].append(f"{image_id} {breed.index + 1} {species_id} {species_counter[breed.species]}")
    for split, lines in rows.items():
        (anns / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (anns / "list.txt").write_text(LIST_HEADER + "\n".join(rows["trainval"] + rows["test"]) + "\n")
    return root
