"""The synthetic shapes VQA task and the small ViLT trained on it (bundled in ``vilt-shapes/``).

- ``shapes_vqa.scenes``: seeded scene + template-question generator (object masks kept).
- ``python -m shapes_vqa.train``: trains the ViLT on CPU and saves model + processor.
- ``python -m shapes_vqa.make_heldout``: writes held-out scenes and pairs.jsonl to ``heldout/``.

Load the bundled model offline with ``ViltProcessor.from_pretrained(MODEL_DIR)`` and
``ViltForQuestionAnswering.from_pretrained(MODEL_DIR)``, or in the app with
``run_app.py -m vilt shapes_vqa/vilt-shapes``.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "vilt-shapes"
HELDOUT_DIR = Path(__file__).resolve().parent / "heldout"
