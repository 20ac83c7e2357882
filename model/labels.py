"""The 37 Oxford-IIIT Pet breeds, in torchvision's OxfordIIITPet class order (dataset class id 1..37).

The dataset names each image after its breed; cat breeds are the capitalised names ("Abyssinian_12.jpg"),
dog breeds lower case ("beagle_3.jpg"). torchvision titles them with spaces ("American Pit Bull Terrier"),
which is the label the service returns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Breed:
    index: int  # 0-based class index, as torchvision's OxfordIIITPet returns it
    file_prefix: str  # how the dataset's image files and list.txt name it
    species: str  # "cat" or "dog"

    @property
    def label(self) -> str:
        """torchvision's class name, e.g. 'american_pit_bull_terrier' -> 'American Pit Bull Terrier'."""
        return " ".join(part.title() for part in self.file_prefix.split("_"))


_PREFIXES = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll",
    "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip

# The dataset's own convention (and its list.txt SPECIES column): capitalised file names are cats.
BREEDS: tuple[Breed, ...] = tuple(
    Breed(i, prefix, "cat" if prefix[0].isupper() else "dog") for i, prefix in enumerate(_PREFIXES)
)
PET_LABELS: tuple[str, ...] = tuple(b.label for b in BREEDS)
PET_SPECIES: tuple[str, ...] = tuple(b.species for b in BREEDS)
NUM_PET_CLASSES = len(BREEDS)


def species_of(label: str) -> str:
    """Species of a breed label ('Bengal' -> 'cat'); 'unknown' for labels outside the Pet set."""
    return _SPECIES_BY_LABEL.get(label, "unknown")


def breed_key(label: str) -> str:
    """A label reduced to its words, lower case: 'American_Pit_Bull_Terrier', 'american pit bull terrier' and
    'american-pit-bull-terrier' are one breed, however a published checkpoint spelt it."""
    return " ".join(label.replace("_", " ").replace("-", " ").lower().split())


def breed_species(label: str) -> str:
    """species_of for labels spelt any way a checkpoint's id2label spells the Pet breeds; 'unknown' otherwise."""
    return _SPECIES_BY_KEY.get(breed_key(label), "unknown")


_SPECIES_BY_LABEL = dict(zip(PET_LABELS, PET_SPECIES, strict=True))
_SPECIES_BY_KEY = {breed_key(b.file_prefix): b.species for b in BREEDS}
