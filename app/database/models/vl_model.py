"""The interface every live model implements, and the image loader they share.

A live model turns one (image, text) pair into one record in the database format
(docs/ARCHITECTURE.md, "The record"). The app and the batch extractor call
:meth:`VL_Model.data_setup`; whatever it returns is validated by ``VliLmdb.add_record`` before
anything is written, exactly like a record pickled by a user script.

Writing your own model (see docs/models.md)::

    # app/database/models/my_model.py   ->   run_app.py -m my_model ARG ...
    from app.database.models.vl_model import VL_Model

    class My_Model(VL_Model):          # the class name is the module name, str.title()'d
        def __init__(self, checkpoint):  # run_app.py passes the arguments after the name as strings
            ...
        def data_setup(self, ex_id, image_location, input_text):
            image = self.load_image(image_location)   # (H, W, 3) uint8
            ...
            return {"ex_id": ex_id, "image": image, "tokens": [...], "txt_len": ...,
                    "img_coords": [...], "attention": ..., "hidden_states": ...}
"""
import abc
import inspect
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the path."""


def load_image(path) -> np.ndarray:
    """Read the image at ``path`` as an ``(H, W, 3)`` uint8 RGB array.

    Any format Pillow reads is accepted; palette, grey, 16-bit and alpha images are converted to
    RGB (alpha is dropped). Raises :class:`ImageLoadError` naming the path when the file is
    missing, not an image, truncated, or too large for Pillow's decompression-bomb limit.
    """
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not an image Pillow can read: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image {path}: {e}") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def pixels_to_image(pixel_values, image_processor) -> np.ndarray:
    """A processor's (3, H, W) ``pixel_values`` back to (H, W, 3) uint8 RGB: the image the model saw."""
    pixels = pixel_values.detach().float().cpu().numpy()
    if getattr(image_processor, "do_normalize", False):
        mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(-1, 1, 1)
        pixels = pixels * std + mean
    if getattr(image_processor, "do_rescale", False):
        pixels = pixels / image_processor.rescale_factor
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


class VL_Model(abc.ABC):  # noqa: N801 - the name users' existing classes subclass
    """A vision-language model that can be run live on new (image, text) pairs."""

    @abc.abstractmethod
    def data_setup(self, ex_id: int, image_location: str, input_text: str) -> dict:
        """Run the model on one pair and return one record in the database format.

        ``ex_id``: the id the record will be stored under (put it in ``record["ex_id"]``).
        ``image_location``: a local file path (uploads are saved to a temporary file first).
        ``input_text``: the question / caption as typed.

        The record needs ``ex_id, image, tokens, txt_len, img_coords, attention
        (n_layers, n_heads, n, n), hidden_states (n_layers + 1, n, hidden)`` and may add
        ``accuracy``, ``prediction``, ``custom_metrics``, ``text``, ``notes``; a decoder gives
        ``modality`` (tokens in sequence order, then ``txt_len`` may go), ``grid`` or ``grids``,
        ``generated`` and ``special`` (README, "The database format").
        """

    def data_setup_batch(self, items) -> list:
        """Run the model on several pairs at once: the extractor's ``--batch-size``.

        ``items``: a list of ``(ex_id, image_location, input_text)`` or ``(ex_id, image_location,
        input_text, label)`` tuples (``label``: the expected answer or None), as :meth:`data_setup` takes them.
        Returns one entry per item, in order: the record :meth:`data_setup` would return for that pair
        run alone (``label`` given to a data_setup that accepts it), or the exception that pair raised,
        so that one bad pair fails alone and never loses the others. :func:`run_data_setup_batch`
        finishes the records as :func:`run_data_setup` does (``ex_id``, ``label``, ``accuracy``).

        This default runs the pairs one by one, so every model supports the option; a model overrides
        it to run them as one batch (``Hf`` does), with records equal to those of the pairs run alone.
        """
        results = []
        for item in items:
            try:
                results.append(_call_data_setup(self, *batch_item(item)))
            except Exception as e:  # noqa: BLE001 - that pair's own failure, returned in its place
                results.append(e)
        return results

    def dimensions(self) -> Optional[tuple[int, int, int]]:
        """``(n_layers, n_heads, hidden_size)`` of the records this model writes, or None when unknown.

        The app compares it with the database's at start-up, so that a model that cannot fit the
        database is refused before anyone adds an example; None leaves the check to the first add.
        """
        return None

    def input_hint(self) -> Optional[str]:
        """What images the model expects, in a few words shown in the "Add example" help (e.g.
        "scenes like those in data/val/ (96×96)"), or None when it does not say."""
        return None

    # Interventions: the model re-run on a stored example, changed on the way (the "Interventions" panel,
    # present only when ``supports_interventions`` is true). ``image``, ``text``: the example's stored
    # image and text; ``patches``: its image tokens' (x, y) in stored order (None: the whole grid,
    # row-major). Token positions are in the stored order (text, image special tokens, patches). A
    # prediction is {"answer", "score", "index" (into "logits"), "top": [[answer, score], ...],
    # "logits", "scores" (float32 arrays over the answers), "tokens" (the re-run's tokens)}.
    # Optional: a model that implements the six methods below sets this True (Vilt does); the
    # interventions panel is shown only for such models, so the defaults never run from the page.
    supports_interventions = False

    def predict(self, image, text: str, patches=None) -> dict:
        """The prediction of an unchanged re-run (what the interventions are compared with)."""
        raise NotImplementedError(f"{type(self).__name__} does not re-run stored examples")

    def ablate(self, image, text: str, heads, patches=None) -> dict:
        """The prediction with the heads ``[(layer, head), ...]`` (0-based) zeroed."""
        raise NotImplementedError(f"{type(self).__name__} does not ablate heads")

    def mask_patches(self, image, text: str, removed_sets, patches=None) -> list:
        """One prediction per list of image token positions in ``removed_sets``, those tokens removed."""
        raise NotImplementedError(f"{type(self).__name__} does not mask image tokens")

    def patch_activations(self, clean, corrupted, columns, progress=None) -> dict:
        """Activation patching: ``clean``, ``corrupted`` are ``(image, text, patches)``; for every layer
        and every list of positions in ``columns``, the clean answer's logit when the corrupted run gets
        the clean run's output of that layer at those positions. Returns {"clean", "corrupted"
        (predictions), "patched" (float32 (n_layers, len(columns)))}. ``progress(done, total)``, when
        given, is called as the layers are done (the page draws a progress bar from it)."""
        raise NotImplementedError(f"{type(self).__name__} does not patch activations")

    def patch_heads(self, clean, corrupted, progress=None) -> dict:
        """Activation patching per head: for every layer and head, the clean answer's logit when the
        corrupted run gets the clean run's output of that head (its context at the input of the attention
        output projection, at every position). Returns {"clean", "corrupted", "patched" (float32
        (n_layers, n_heads))}; ``progress`` as in :meth:`patch_activations`."""
        raise NotImplementedError(f"{type(self).__name__} does not patch heads")

    def ablate_each_head(self, image, text: str, patches=None, progress=None) -> dict:
        """The head ablation sweep: every head zeroed alone. Returns {"original" (the unchanged re-run's
        prediction), "scores" (float32 (n_layers, n_heads): the original answer's score with that head
        zeroed), "answers" (the top answer then, a list of n_layers lists)}; ``progress`` as in
        :meth:`patch_activations`."""
        raise NotImplementedError(f"{type(self).__name__} does not ablate heads")

    @staticmethod
    def load_image(path) -> np.ndarray:
        """:func:`load_image`, for use as ``self.load_image(path)`` in subclasses."""
        return load_image(path)


def _accepts_label(method) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "label" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def run_data_setup(model: VL_Model, ex_id: int, image_location: str, input_text: str, label=None) -> dict:
    """Call ``model.data_setup`` the way the app and the extractor do.

    ``label`` (the expected answer) is passed as a keyword only to models whose ``data_setup``
    accepts ``label`` (or ``**kwargs``), like :class:`~app.database.models.vilt.Vilt`. For other
    models, when the record has a ``prediction`` and no ``accuracy``, the label is filled into
    ``prediction["label"]`` and ``accuracy`` is ``answer == label`` (case and surrounding
    whitespace ignored). ``record["ex_id"]`` is set to ``ex_id``. The record is *not* validated
    here: ``VliLmdb.add_record`` does that.
    """
    return _finished(model, _call_data_setup(model, ex_id, image_location, input_text, label), ex_id, label)


def run_data_setup_batch(model: VL_Model, items) -> list:
    """:func:`run_data_setup` for several pairs through ``model.data_setup_batch`` (see its contract):
    per item, in order, the finished record or the exception of that pair.

    A ``data_setup_batch`` that raises has failed as a whole (out of memory, a pair it did not isolate):
    every pair is then run alone, so that only the bad ones fail. One that returns another number of
    entries is broken: every pair gets that TypeError.
    """
    items = [batch_item(item) for item in items]
    try:
        results = list(model.data_setup_batch(items))
    except Exception:  # noqa: BLE001 - the batch failed as a whole: the default runs the pairs alone
        results = VL_Model.data_setup_batch(model, items)
    if len(results) != len(items):
        broken = TypeError(f"{type(model).__name__}.data_setup_batch returned {len(results)} entries for "
                           f"{len(items)} pairs")
        return [broken] * len(items)
    finished = []
    for (ex_id, _image, _text, label), result in zip(items, results):
        try:
            finished.append(result if isinstance(result, BaseException) else _finished(model, result, ex_id, label))
        except Exception as e:  # noqa: BLE001 - not a record: that pair fails
            finished.append(e)
    return finished


def batch_item(item) -> tuple:
    """``(ex_id, image_location, input_text, label)`` of one item of :meth:`VL_Model.data_setup_batch`."""
    if not isinstance(item, (tuple, list)) or len(item) not in (3, 4):
        raise ValueError(f"data_setup_batch: expected items (ex_id, image_location, text[, label]), got {item!r}")
    return (*item, None) if len(item) == 3 else tuple(item)


def _call_data_setup(model: VL_Model, ex_id: int, image_location: str, input_text: str, label):
    if label is not None and _accepts_label(model.data_setup):
        return model.data_setup(ex_id, image_location, input_text, label=label)
    return model.data_setup(ex_id, image_location, input_text)


def _finished(model: VL_Model, record, ex_id: int, label) -> dict:
    """``record`` as :func:`run_data_setup` returns it: checked to be a dict, ``ex_id`` set, the label
    and accuracy filled in for models that do not take the label themselves."""
    if not isinstance(record, dict):
        raise TypeError(f"{type(model).__name__}.data_setup returned {type(record).__name__}, not a dict")
    record["ex_id"] = int(ex_id)
    prediction = record.get("prediction")
    if label is not None and isinstance(prediction, dict) and record.get("accuracy") is None:
        if prediction.get("label") is None:
            prediction["label"] = str(label)
        if isinstance(prediction.get("answer"), str):
            record["accuracy"] = same_answer(prediction["answer"], label)
    return record


def same_answer(answer, label) -> bool:
    """``answer == label``, ignoring case and surrounding / repeated whitespace."""
    return " ".join(str(answer).split()).lower() == " ".join(str(label).split()).lower()
