"""The 37 breeds: torchvision's OxfordIIITPet class order and names, and the species split."""

from __future__ import annotations

import random
from pathlib import Path

from torchvision.datasets import OxfordIIITPet

from model.labels import BREEDS, NUM_PET_CLASSES, PET_LABELS, PET_SPECIES, species_of

CATS = {
    "Abyssinian", "Bengal", "Birman", "Bombay", "British Shorthair", "Egyptian Mau", "Maine Coon", "Persian",
    "Ragdoll", "Russian Blue", "Siamese", "Sphynx",
}  # fmt: skip


def test_37_breeds_12_cats_25_dogs() -> None:
    assert NUM_PET_CLASSES == len(PET_LABELS) == len(set(PET_LABELS)) == 37
    assert {label for label, species in zip(PET_LABELS, PET_SPECIES, strict=True) if species == "cat"} == CATS
    assert PET_SPECIES.count("dog") == 25
    assert [b.index for b in BREEDS] == list(range(37))


def test_class_ids_follow_the_dataset_alphabetical_order() -> None:
    """list.txt numbers the breeds 1..37 alphabetically, ignoring case (Abyssinian=1 ... yorkshire_terrier=37)."""
    prefixes = [b.file_prefix for b in BREEDS]
    assert prefixes == sorted(prefixes, key=str.lower)
    assert (prefixes[0], prefixes[5], prefixes[36]) == ("Abyssinian", "Bengal", "yorkshire_terrier")


def test_torchvision_dataset_derives_the_same_names_and_order(tmp_path: Path) -> None:
    """Run torchvision's own OxfordIIITPet over a stub of the dataset: one annotation line per breed."""
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lines = [f"{b.file_prefix}_1 {b.index + 1} {1 if b.species == 'cat' else 2} 1" for b in BREEDS]
    random.Random(0).shuffle(lines)  # torchvision orders by class id, not by line order
    (base / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    dataset = OxfordIIITPet(str(tmp_path), split="trainval")
    assert tuple(dataset.classes) == PET_LABELS
    assert "American Pit Bull Terrier" in PET_LABELS and "German Shorthaired" in PET_LABELS


def test_species_of() -> None:
    assert species_of("Bengal") == "cat"
    assert species_of("Great Pyrenees") == "dog"
    assert species_of("Zebra") == "unknown"
