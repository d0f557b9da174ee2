"""Live models and their loader.

``load_model("vilt", ["dandelin/vilt-b32-finetuned-vqa"])`` imports ``app/database/models/vilt.py``
and returns ``Vilt("dandelin/vilt-b32-finetuned-vqa")``: the module is the name lower-cased, the
class is ``name.title()`` (``my_model`` -> ``My_Model``), and the parameters are passed as
positional strings. ``run_app.py -m NAME PARAM ...`` and ``python -m app.database.extract -m NAME
PARAM ...`` both go through here.
"""
import importlib
import inspect
import pkgutil
import re
import sys
import time

from app.database.models.vl_model import ImageLoadError, VL_Model, load_image, run_data_setup

__all__ = ["ImageLoadError", "ModelLoadError", "VL_Model", "available_models", "load_image", "load_model",
           "run_data_setup"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NOT_MODELS = ("vl_model", "capture")  # the model interface and the capture API, not models


class ModelLoadError(Exception):
    """The model named on the command line could not be loaded; the message is one line."""


def available_models() -> list[str]:
    """Module names under app/database/models/ that may hold a model (:data:`NOT_MODELS` excluded)."""
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in NOT_MODELS
    )


def load_model(name: str, params=(), progress: bool = True) -> VL_Model:
    """Import ``app/database/models/<name>.py`` and instantiate ``<Name>(*params)``.

    Raises :class:`ModelLoadError` with a one-line message when the module or the class is
    missing, the class is not a :class:`VL_Model` subclass, or its constructor fails (the cause is
    chained). With ``progress`` a line is printed to stderr before and after loading.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ModelLoadError(f"invalid model name {name!r}: use a module name from app/database/models/")
    params = [str(p) for p in params]
    module_name = name.lower()
    if module_name in NOT_MODELS:
        raise ModelLoadError(f"app/database/models/{module_name}.py is not a model (available: "
                             f"{', '.join(available_models())})")
    class_name = name.title()
    qualified = f"{__name__}.{module_name}"
    if progress:
        print(f"Loading model {class_name}({', '.join(params)}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as e:
        if e.name == qualified:
            raise ModelLoadError(
                f"no model module app/database/models/{module_name}.py "
                f"(available: {', '.join(available_models()) or 'none'})"
            ) from None
        raise ModelLoadError(
            f"model module app/database/models/{module_name}.py needs {e.name!r}, which is not installed"
        ) from e
    except Exception as e:  # a syntax error or a failing import inside the user's module
        raise ModelLoadError(
            f"cannot import app/database/models/{module_name}.py: {type(e).__name__}: {' '.join(str(e).split())}"
        ) from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelLoadError(f"app/database/models/{module_name}.py defines no class {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, VL_Model)):
        raise ModelLoadError(
            f"{class_name} in app/database/models/{module_name}.py is not a subclass of "
            "app.database.models.vl_model.VL_Model"
        )
    usage = _usage(cls)
    if usage is not None:
        try:
            inspect.signature(cls).bind(*params)
        except TypeError:
            raise ModelLoadError(f"{class_name} needs {usage or 'no parameters'}: -m {name} {usage}".rstrip()) from None
    try:
        model = cls(*params)
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(f"cannot load model {class_name}({', '.join(params)}): {msg}") from e
    if progress:
        print(f"Loaded model {class_name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model


def _usage(cls):
    """The parameters ``cls`` takes on the command line, e.g. "CHECKPOINT [DEVICE]" ("" for none),
    or None when its signature cannot be read (then the constructor's own error is shown)."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    words = []
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            words.append(f"[{p.name.upper()} ...]")
        elif p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            words.append(p.name.upper() if p.default is inspect.Parameter.empty else f"[{p.name.upper()}]")
    return " ".join(words)
