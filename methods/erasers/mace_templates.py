"""Prompt templates of the official MACE code (Shilin-LU/MACE, src/cfr_utils.py, `prompt_augmentation`).

MACE's configs set `aug_length: 30` and `prompt_len: 30`, so src/dataset.py samples all of the first 30
templates of the concept's type (in a random order, which the sums of the closed forms do not see): the
31st of each list is never used. Celebrities and explicit content use the object list, artists the style list.
"""

from __future__ import annotations

OBJECT = [
    "{} in a photo",
    "{} in a snapshot",
    "A snapshot of {}",
    "A photograph showcasing {}",
    "An illustration of {}",
    "A digital rendering of {}",
    "A visual representation of {}",
    "A graphic of {}",
    "A shot of {}",
    "A photo of {}",
    "A black and white image of {}",
    "A depiction in portrait form of {}",
    "A scene depicting {} during a public gathering",
    "{} captured in an image",
    "A depiction created with oil paints capturing {}",
    "An image of {}",
    "A drawing capturing the essence of {}",
    "An official photograph featuring {}",
    "A detailed sketch of {}",
    "{} during sunset/sunrise",
    "{} in a detailed portrait",
    "An official photo of {}",
    "Historic photo of {}",
    "Detailed portrait of {}",
    "A painting of {}",
    "HD picture of {}",
    "Magazine cover capturing {}",
    "Painting-like image of {}",
    "Hand-drawn art of {}",
    "An oil portrait of {}",
]

STYLE = [
    "An artwork by {}",
    "Art piece by {}",
    "A recent creation by {}",
    "{}'s renowned art",
    "Latest masterpiece by {}",
    "A stunning image by {}",
    "An art in {}'s style",
    "Exhibition artwork of {}",
    "Art display by {}",
    "a beautiful painting by {}",
    "An image inspired by {}'s style",
    "A sketch by {}",
    "Art piece representing {}",
    "A drawing by {}",
    "Artistry showcasing {}",
    "An illustration by {}",
    "A digital art by {}",
    "A visual art by {}",
    "A reproduction inspired by {}'s colorful, expressive style",
    "Famous painting of {}",
    "A famous art by {}",
    "Artistic style of {}",
    "{}'s famous piece",
    "Abstract work of {}",
    "{}'s famous drawing",
    "Art from {}'s early period",
    "A portrait by {}",
    "An imitation reflecting the style of {}",
    "An painting from {}'s collection",
    "Vibrant reproduction of artwork by {}",
]

TEMPLATES = {"object": OBJECT, "style": STYLE}
