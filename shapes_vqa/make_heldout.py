"""Write held-out shapes scenes (PNG) and one question each (pairs.jsonl) into shapes_vqa/heldout/.

    python -m shapes_vqa.make_heldout [--out DIR] [--n 30]

The seed differs from training's and evaluation's, so these scenes were never trained on.
Each line of pairs.jsonl is {"image": path relative to the folder, "text": question,
"label": answer}; question types cycle through color, shape, exist, count, position.
``examples()`` regenerates the same examples (with object masks) for tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from shapes_vqa import scenes

HELDOUT_SEED = 2
DEFAULT_N = 30
DEFAULT_OUT = Path(__file__).resolve().parent / "heldout"


def examples(n: int = DEFAULT_N) -> list[scenes.Example]:
    """The held-out examples, identical to what ``write`` saves."""
    return scenes.generate(n, HELDOUT_SEED)


def write(out: Path = DEFAULT_OUT, n: int = DEFAULT_N) -> Path:
    """Write n scenes and pairs.jsonl into ``out``; returns the pairs.jsonl path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples(n)):
        name = f"scene_{i:03d}.png"
        Image.fromarray(ex.scene.image).save(out / name)
        lines.append(json.dumps({"image": name, "text": ex.question, "label": ex.answer}))
    pairs = out / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--n", type=int, default=DEFAULT_N)
    a = p.parse_args(argv)
    print(f"wrote {write(a.out, a.n)}")


if __name__ == "__main__":
    main()
