"""The digits CNN: trained on the scikit-learn digits on first use, then cached on disk.

Training is seeded (weights, batch order) and takes a few seconds on two cores; the resulting
state dict is cached under `models.cache.cache_dir()` and retrained whenever the cache is
missing, unreadable or does not fit the architecture.
"""

from __future__ import annotations

import hashlib
import logging
import time

import torch
import torch.nn.functional as F

from models.cache import cache_dir, load_state_dict, save_state_dict
from models.digits import DigitsData, training_set
from models.seeding import seeded
from models.small import DigitsCNN
from models.zoo_model import ZooModel, classifier_zoo_model

logger = logging.getLogger(__name__)

TRAINING_SEED = 0
EPOCHS = 10
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
#: Bump when the training code changes in a way the recipe constants below do not show.
RECIPE_VERSION = 1


def cache_file_name() -> str:
    """Returns the cache file name, which changes with the architecture and the recipe.

    Weights trained by another recipe are thus never loaded: they just sit under another name.
    """
    recipe = (RECIPE_VERSION, TRAINING_SEED, EPOCHS, BATCH_SIZE, LEARNING_RATE, str(DigitsCNN()))
    return f"digits_cnn-{hashlib.sha256(repr(recipe).encode()).hexdigest()[:16]}.pt"


def train_digits_cnn(seed: int = TRAINING_SEED) -> DigitsCNN:
    """Trains a DigitsCNN on the training split with Adam and a seeded batch order.

    Args:
        seed: Seeds both the initial weights and the order of the mini-batches.

    Returns:
        The trained model, in eval mode.
    """
    images, labels = training_set()
    with seeded(seed):
        model = DigitsCNN()
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=EPOCHS)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(BATCH_SIZE):
            optimiser.zero_grad()
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimiser.step()
        scheduler.step()
    return model.eval()


def _load_cached(model: DigitsCNN) -> bool:
    """Loads the cached weights into `model`; False when there is no usable cache."""
    path = cache_dir() / cache_file_name()
    state_dict = load_state_dict(path)
    if state_dict is None:
        return False
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        logger.warning("ignoring the weights cache %s: %s", path, error)
        return False
    logger.debug("loaded the digits CNN from %s", path)
    return True


def trained_digits_cnn() -> DigitsCNN:
    """Returns the trained digits CNN in eval mode, from the cache or by training it now."""
    model = DigitsCNN()
    if _load_cached(model):
        return model.eval()
    start = time.perf_counter()
    model = train_digits_cnn()
    path = cache_dir() / cache_file_name()
    saved = save_state_dict(model.state_dict(), path)
    logger.info(
        "trained the digits CNN in %.1f s%s",
        time.perf_counter() - start,
        f", cached at {path}" if saved else "",
    )
    return model


def build_digits_cnn() -> ZooModel:
    """Returns the trained digits CNN on the native 1x8x8 digits."""
    description = "small conv-BN-ReLU CNN trained on the scikit-learn digits (1x8x8), cached"
    return classifier_zoo_model("digits-cnn", description, trained_digits_cnn(), DigitsData("image8"))
