"""Record attention and hidden states from any PyTorch model while the user's own forward pass runs.

::

    from app.database.models.capture import capture, record_local

    with capture(model) as cap:
        model(inputs)                      # the user's own call; its output is not changed
    record = cap.to_record(ex_id, image, tokens, modality=..., img_coords=..., grid=...)
    db.add_record(record)

Attention modules found by :func:`capture` (see docs/models.md, "Any PyTorch model: the capture API"):

- the modules a ``transformers`` model lists under ``"attentions"`` in its ``_can_record_outputs`` (what
  ``output_attentions=True`` records in transformers 5): their output's element at the listed index (1 by
  default) is the weights, which only eager attention returns (SDPA and flash attention return ``None``);
- ``torch.nn.MultiheadAttention``: the weights are recomputed from the same inputs with
  ``need_weights=True, average_attn_weights=False`` (and no dropout), so the user's call and its result
  stay as they are;
- timm's ``Attention`` (class name ``Attention`` with ``qkv``, ``num_heads`` and ``fused_attn``):
  ``softmax(q k^T * scale)`` recomputed from its own ``qkv`` (and ``q_norm``/``k_norm``), fused or not;
- any module named in ``attention_modules``: its output's second element, or what ``weights_of`` returns.

Hidden states are the input of the first block and the output of every block of the model's main
``nn.ModuleList`` of blocks (as ``output_hidden_states`` gives them, but without a final norm).

Threads: a capture records only what runs on the thread that opened the block (module hooks check the
thread; :func:`record_local` follows the thread's own open capture and ``sys.setprofile`` is per thread).
The one process-wide change is ``torch.backends.mha`` 's fast path, turned off while any block over a model
with ``nn.MultiheadAttention`` is open (counted across threads), since the fused path of
``nn.TransformerEncoderLayer`` (eval mode without grad) bypasses its ``self_attn``.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections import Counter
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from app.database.records import OPTIONAL_FIELDS, RecordError

__all__ = ["Capture", "capture", "record_local"]

WeightsOf = Callable[[nn.Module, tuple, Any], Optional[torch.Tensor]]

SEARCHED_KINDS = ("transformers attention classes (eager)", "torch.nn.MultiheadAttention", "timm Attention")
_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_OPEN = threading.local()  # .captures: the captures this thread has open, innermost last


class _FastPathOff:
    """torch's fused MHA fast path, off while any capture that needs it off is open (on any thread):
    the first one turns it off, the last one restores the setting it found."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._before = True

    def acquire(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._before = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                torch.backends.mha.set_fastpath_enabled(self._before)


_FAST_PATH_OFF = _FastPathOff()


def _open_capture() -> Optional["Capture"]:
    captures = getattr(_OPEN, "captures", None)
    return captures[-1] if captures else None


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy().copy()


def _snapshot(value: Any) -> Any:
    """A copy of a recorded local that later in-place changes cannot reach."""
    if isinstance(value, torch.Tensor):
        return _to_numpy(value)
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _block_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The hidden states a block is called with: its first positional tensor, else ``hidden_states=``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states")


def _block_output(output: Any) -> Optional[torch.Tensor]:
    """The hidden states a block returns: the tensor, or the first element of a tuple."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


# -- the attention kinds ---------------------------------------------------------------------------

def _output_element(index: int) -> Callable:
    """Weights as element ``index`` of a tuple output (transformers); None when the module returns a
    bare tensor (it discards its weights, e.g. Qwen2-VL's vision attention) or None (SDPA)."""
    def weights(module, args, kwargs, output):
        return output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
    return weights


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _multihead_weights(module: nn.MultiheadAttention, args, kwargs, output) -> torch.Tensor:
    """The per-head weights of the call just made, recomputed without dropout (the user's own call may
    have asked for none, or for their mean); rerunning in eval mode draws no random numbers."""
    call = _forward_signature(type(module)).bind(module, *args, **kwargs)
    call.arguments.update(need_weights=True, average_attn_weights=False)
    was_training = module.training
    module.training = False
    try:
        with torch.no_grad():
            return type(module).forward(*call.args, **call.kwargs)[1]
    finally:
        module.training = was_training


def _is_timm_attention(module: nn.Module) -> bool:
    return (type(module).__name__ == "Attention" and hasattr(module, "fused_attn")
            and isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "num_heads", None), int))


def _timm_weights(module: nn.Module, args, kwargs, output) -> torch.Tensor:
    """softmax(q k^T * scale (+ mask)) from the module's own qkv and norms, as its non-fused path
    computes it (the fused path never materialises the weights)."""
    x = args[0] if args else kwargs["x"]
    mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
    with torch.no_grad():
        batch, length, _ = x.shape
        qkv = module.qkv.forward(x).reshape(batch, length, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        if getattr(module, "q_norm", None) is not None:
            q, k = module.q_norm.forward(q), module.k_norm.forward(k)
        scores = (q * getattr(module, "scale", q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(dim=-1)


def _transformers_specs(can_record: Optional[dict]) -> list[tuple]:
    """(class, class name, layer name, output index) of each entry under "attentions" of a
    transformers ``_can_record_outputs`` (a class, a class name, or an OutputRecorder; a list of them)."""
    entries = (can_record or {}).get("attentions")
    if entries is None:
        return []
    specs = []
    for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
        if isinstance(entry, str):
            specs.append((None, entry, None, 1))
        elif isinstance(entry, type):
            specs.append((entry, None, None, 1))
        else:  # transformers.utils.output_capturing.OutputRecorder
            specs.append((entry.target_class, entry.class_name, entry.layer_name, entry.index))
    return specs


def _transformers_attention(model: nn.Module) -> dict[nn.Module, int]:
    """{module: output index of its weights} for what transformers records as ``attentions``: each
    submodel (a PreTrainedModel) applies its own ``_can_record_outputs`` to its part of the tree,
    matched as transformers matches it (class, or path suffix, within an optional layer name)."""
    found = {}

    def visit(module: nn.Module, path: str, specs: list) -> None:
        if hasattr(module, "_can_record_outputs"):
            specs = _transformers_specs(module._can_record_outputs)
        for target, class_name, layer_name, index in specs:
            matches = ((target is not None and isinstance(module, target))
                       or (class_name is not None and (path.endswith(class_name) or type(module).__name__ == class_name)))
            if matches and (layer_name is None or f".{layer_name.strip('.')}." in path + "."):
                found[module] = index
                break
        for name, child in module.named_children():
            visit(child, f"{path}.{name}", specs)

    visit(model, "", [])
    return found


# -- capture ---------------------------------------------------------------------------------------

class Capture:
    """What one or more ``with`` blocks recorded (see :func:`capture`).

    ``attentions``: one float32 array per attention call, in call order, shaped as the module gives it
    ((batch, heads, queries, keys), or (heads, queries, keys) for an unbatched call);
    ``attention_names``: the module name of each; ``hidden_states``: the input of the first block and the
    output of every block, per forward pass, as float32 arrays; ``locals``: ``{function qualname: [value
    per call]}`` from :func:`record_local`; ``attention_modules``: ``{name: kind}`` of every module watched;
    ``blocks``: the name of the block list whose hidden states are recorded (None when none was found).
    """

    def __init__(self, model: nn.Module, attention_modules: Sequence[Union[str, type]] = (),
                 weights_of: Optional[WeightsOf] = None, blocks: Union[str, nn.Module, None] = None):
        self.attentions: list[np.ndarray] = []
        self.attention_names: list[str] = []
        self.hidden_states: list[np.ndarray] = []
        self.locals: dict[str, list] = {}
        self._watch = self._attention_watch(model, attention_modules, weights_of)
        self._names = {module: name for name, module in model.named_modules()}
        self.attention_modules = {self._names[m]: kind for m, (kind, _) in self._watch.items()}
        self._block_list, self.blocks = self._block_list_of(model, blocks)
        self._without_weights: dict[str, str] = {}  # module name -> kind, for the calls that gave no weights
        self._handles: list = []
        self._thread: Optional[int] = None  # the thread that opened the block; None while closed
        self._holds_fast_path = False

    @staticmethod
    def _attention_watch(model, attention_modules, weights_of) -> dict[nn.Module, tuple[str, Callable]]:
        """{module: (kind, weights(module, args, kwargs, output))}; the user's names come first."""
        watch = {}
        modules = dict(model.named_modules())
        for wanted in attention_modules:
            if isinstance(wanted, str):
                if wanted not in modules:
                    raise ValueError(f"capture(attention_modules=...): the model has no module named {wanted!r}")
                chosen = [modules[wanted]]
            elif isinstance(wanted, type):
                chosen = [m for m in modules.values() if isinstance(m, wanted)]
                if not chosen:
                    raise ValueError(f"capture(attention_modules=...): the model has no module of class "
                                     f"{wanted.__qualname__}")
            else:
                raise TypeError(f"capture(attention_modules=...): expected module names or classes, got {wanted!r}")
            for module in chosen:
                watch[module] = ("named", _named_weights(weights_of))
        transformers_index = _transformers_attention(model)
        for module in modules.values():
            if module in watch:
                continue
            if isinstance(module, nn.MultiheadAttention):
                watch[module] = ("torch.nn.MultiheadAttention", _multihead_weights)
            elif _is_timm_attention(module):
                watch[module] = ("timm Attention", _timm_weights)
            elif module in transformers_index:
                watch[module] = ("transformers", _output_element(transformers_index[module]))
        return watch

    def _block_list_of(self, model, blocks) -> tuple[Optional[nn.Module], Optional[str]]:
        """The given block list, or the ModuleList with the most children that each hold a watched
        attention module (the last such list on a tie: a VLM's language model comes after its vision tower)."""
        if isinstance(blocks, str):
            found = dict(model.named_modules()).get(blocks)
            if found is None:
                raise ValueError(f"capture(blocks={blocks!r}): the model has no module of that name")
            blocks = found
        if isinstance(blocks, nn.Module):
            if blocks not in self._names:
                raise ValueError("capture(blocks=...): the module given is not part of the model")
            if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks):
                raise ValueError(f"capture(blocks={self._names[blocks]!r}): expected a non-empty nn.ModuleList or "
                                 f"nn.Sequential of blocks, got {type(blocks).__name__}")
            return blocks, self._names[blocks]
        if blocks is not None:
            raise TypeError(f"capture(blocks=...): expected a module name or an nn.Module, got {blocks!r}")
        best = None
        for module in model.modules():
            if isinstance(module, nn.ModuleList) and len(module) and all(
                    any(sub in self._watch for sub in child.modules()) for child in module):
                if best is None or len(module) >= len(best):
                    best = module
        return best, None if best is None else self._names[best]

    def __enter__(self) -> "Capture":
        if self._thread is not None:
            raise RuntimeError("this capture is already open; open a new capture(model) for a nested block")
        self._thread = threading.get_ident()
        try:
            for module, (kind, weights) in self._watch.items():
                hook = functools.partial(self._on_attention, self._names[module], kind, weights)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            if self._block_list is not None:
                blocks = list(self._block_list)
                self._handles.append(blocks[0].register_forward_pre_hook(self._on_first_block, with_kwargs=True))
                self._handles.extend(block.register_forward_hook(self._on_block) for block in blocks)
            if any(kind == "torch.nn.MultiheadAttention" for kind, _ in self._watch.values()):
                _FAST_PATH_OFF.acquire()
                self._holds_fast_path = True
        except BaseException:
            self._close()
            raise
        if not hasattr(_OPEN, "captures"):
            _OPEN.captures = []
        _OPEN.captures.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _OPEN.captures.remove(self)
        self._close()

    def _close(self) -> None:
        """Remove every hook and give the fast path back (also after a failed __enter__)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._holds_fast_path:
            _FAST_PATH_OFF.release()
            self._holds_fast_path = False
        self._thread = None

    def _on_attention(self, name: str, kind: str, weights_of: Callable, module, args, kwargs, output) -> None:
        if threading.get_ident() != self._thread:
            return
        weights = weights_of(module, args, kwargs, output)
        if weights is None:
            self._without_weights[name] = kind
            return
        self.attentions.append(_to_numpy(weights))
        self.attention_names.append(name)

    def _on_first_block(self, module, args, kwargs) -> None:
        if threading.get_ident() == self._thread:
            self._append_hidden(_block_input(args, kwargs))

    def _on_block(self, module, args, output) -> None:
        if threading.get_ident() == self._thread:
            self._append_hidden(_block_output(output))

    def _append_hidden(self, tensor: Optional[torch.Tensor]) -> None:
        if tensor is not None:
            self.hidden_states.append(_to_numpy(tensor))

    def _call_recording(self, func: Callable, variable: str, args, kwargs):
        """Run ``func`` with a profile function that, at the return of this very call, reads ``variable``
        from its frame; the slot is reserved first so that recursive calls stay in call order."""
        code, key = func.__code__, func.__qualname__
        values = self.locals.setdefault(key, [])
        slot = len(values)
        values.append(None)
        own_frame = None
        returned = False
        previous = sys.getprofile()
        if previous is not None and not callable(previous):
            raise RuntimeError(f"record_local({variable!r}) on {key}: a C-level profiler ({type(previous).__name__}, "
                               f"e.g. cProfile) is active on this thread; it cannot be chained, so stop it first")

        def profiler(frame, event, arg):
            nonlocal own_frame, returned
            if frame.f_code is code:
                if event == "call" and own_frame is None:
                    own_frame = frame
                elif event == "return" and frame is own_frame and variable in frame.f_locals:
                    values[slot] = _snapshot(frame.f_locals[variable])
                    returned = True
            if previous is not None:
                previous(frame, event, arg)

        sys.setprofile(profiler)
        try:
            result = func(*args, **kwargs)
        finally:
            sys.setprofile(previous)
        if not returned:
            raise ValueError(f"record_local({variable!r}) on {key}: the call returned before assigning "
                             f"{variable!r}, so there is nothing to record")
        return result

    # -- the record ---------------------------------------------------------------------------------

    def to_record(self, ex_id: int, image, tokens: Sequence[str], *, modality: Optional[Sequence[str]] = None,
                  txt_len: Optional[int] = None, img_coords: Optional[Sequence] = None,
                  grid: Optional[tuple[int, int]] = None, attentions: Optional[Sequence] = None,
                  hidden_states: Optional[Sequence] = None, **fields) -> dict:
        """A record (docs/ARCHITECTURE.md, "The record") of one example from what was captured.

        ``attentions``: one array per layer ((heads, n, n) or (1, heads, n, n)); by default the captured
        calls whose queries and keys both number ``len(tokens)``. ``hidden_states``: layers + 1 arrays
        ((n, d), (1, n, d) or (n, 1, d)); by default the captured ones of ``len(tokens)`` positions.
        ``fields``: any other record field (grids, special, prediction, text, notes, ...). Raises
        :class:`~app.database.records.RecordError` (a ValueError) naming the example and the field.
        """
        unknown = sorted(set(fields) - set(OPTIONAL_FIELDS))
        if unknown:
            raise RecordError(ex_id, unknown[0], f"is not a record field (optional fields: {', '.join(OPTIONAL_FIELDS)})")
        tokens = list(tokens)
        n = len(tokens)
        layers = self._layer_attention(ex_id, n, attentions)
        hidden = self._layer_hidden_states(ex_id, n, len(layers), hidden_states)
        heads = {layer.shape[0] for layer in layers}
        if len(heads) > 1:
            raise RecordError(ex_id, "attention", f"the layers have different numbers of heads "
                              f"({', '.join(str(layer.shape[0]) for layer in layers)}): pass attentions= with the "
                              f"calls of one stack of layers")
        widths = {state.shape[1] for state in hidden}
        if len(widths) > 1:
            raise RecordError(ex_id, "hidden_states", f"the hidden states have different widths "
                              f"({', '.join(str(state.shape[1]) for state in hidden)})")
        record = {"ex_id": ex_id, "image": image, "tokens": tokens,
                  "attention": np.stack(layers).astype(np.float32),
                  "hidden_states": np.stack(hidden).astype(np.float32)}
        given = {"modality": modality, "txt_len": txt_len, "img_coords": img_coords, "grid": grid, **fields}
        record.update({name: value for name, value in given.items() if value is not None})
        return record

    def _layer_attention(self, ex_id, n: int, attentions: Optional[Sequence]) -> list[np.ndarray]:
        if attentions is not None:
            layers = [_one_example(ex_id, "attention", np.asarray(a), 3) for a in attentions]
            wrong = next((i for i, a in enumerate(layers) if a.shape[1:] != (n, n)), None)
            if wrong is not None:
                raise RecordError(ex_id, "attention", f"attentions[{wrong}] has shape {layers[wrong].shape}, but "
                                  f"tokens has {n} entries: expected (heads, {n}, {n})")
            if not layers:
                raise RecordError(ex_id, "attention", "attentions= is empty")
            return layers
        if not self.attentions:
            raise RecordError(ex_id, "attention", self._nothing_captured())
        layers = [_one_example(ex_id, "attention", a, 3) for a in self.attentions if a.shape[-2:] == (n, n)]
        if not layers:
            shapes = Counter("x".join(str(s) for s in a.shape[-2:]) for a in self.attentions)
            summary = ", ".join(f"{count} of {shape}" for shape, count in shapes.most_common())
            raise RecordError(ex_id, "tokens", f"captured {len(self.attentions)} attention calls ({summary} "
                              f"queries x keys) but tokens has {n} entries")
        return layers

    def _layer_hidden_states(self, ex_id, n: int, n_layers: int, hidden_states: Optional[Sequence]):
        if hidden_states is None:
            if self._block_list is None:
                raise RecordError(ex_id, "hidden_states", "none were captured: no nn.ModuleList of blocks holding "
                                  "the attention modules was found; pass capture(model, blocks='name') or "
                                  "to_record(hidden_states=[...])")
            states = [_one_example(ex_id, "hidden_states", h, 2) for h in self.hidden_states if n in h.shape[:-1]]
            states = [h for h in states if h.shape[0] == n]
            source = (f"captured from {self.blocks!r} (the input of its first block and the output of each of its "
                      f"{len(self._block_list)} blocks) with {n} positions")
        else:
            states = [_one_example(ex_id, "hidden_states", np.asarray(h), 2) for h in hidden_states]
            wrong = next((i for i, h in enumerate(states) if h.shape[0] != n), None)
            if wrong is not None:
                raise RecordError(ex_id, "hidden_states", f"hidden_states[{wrong}] has shape {states[wrong].shape}, "
                                  f"but tokens has {n} entries: expected ({n}, hidden)")
            source = "given"
        if len(states) != n_layers + 1:
            raise RecordError(ex_id, "hidden_states", f"{len(states)} {source}, but the attention has {n_layers} "
                              f"layers: expected {n_layers + 1} (the embeddings, then one per layer)")
        return states

    def _nothing_captured(self) -> str:
        if self._without_weights:
            names = ", ".join(repr(name) for name in list(self._without_weights)[:3])
            hint = (" a transformers model returns them only with eager attention: load it with "
                    "attn_implementation='eager' (or call model.set_attn_implementation('eager'))"
                    if "transformers" in self._without_weights.values() else "")
            return f"no attention weights were captured: {len(self._without_weights)} modules ({names}) ran but " \
                   f"returned none;{hint}"
        if self._watch:
            return f"no attention was captured: none of the {len(self._watch)} attention modules found " \
                   f"({', '.join(repr(n) for n in list(self.attention_modules)[:3])}) ran inside the capture block"
        return (f"no attention was captured: the model has no module of the kinds searched ({', '.join(SEARCHED_KINDS)}); "
                f"name yours with capture(model, attention_modules=[...], weights_of=...)")


def _named_weights(weights_of: Optional[WeightsOf]) -> Callable:
    """The weights of a module the user named: ``weights_of(module, inputs, output)``, or by default
    the second element of its output."""
    def weights(module, args, kwargs, output):
        if weights_of is not None:
            return weights_of(module, args, output)
        if not isinstance(output, (tuple, list)) or len(output) < 2 or not isinstance(output[1], torch.Tensor):
            raise ValueError(f"capture(attention_modules=...): {type(module).__name__} returned "
                             f"{type(output).__name__}, not a tuple whose second element is the attention "
                             f"weights; pass capture(..., weights_of=lambda module, inputs, output: ...)")
        return output[1]
    return weights


def _one_example(ex_id, field_name: str, array: np.ndarray, ndim: int) -> np.ndarray:
    """``array`` without its batch dimension of 1 (first, or second for a sequence-first hidden state)."""
    if array.ndim == ndim + 1:
        if array.shape[0] == 1:
            return array[0]
        if ndim == 2 and array.shape[1] == 1:
            return array[:, 0]
        raise RecordError(ex_id, field_name, f"captured a batch of {array.shape[0]} examples (shape {array.shape}); "
                          f"a record holds one: run the model on one example")
    if array.ndim != ndim:
        raise RecordError(ex_id, field_name, f"expected arrays of {ndim} dimensions (or {ndim + 1} with a batch of "
                          f"1), got shape {array.shape}")
    return array


def capture(model: nn.Module, attention_modules: Sequence[Union[str, type]] = (),
            weights_of: Optional[WeightsOf] = None, blocks: Union[str, nn.Module, None] = None) -> Capture:
    """Watch ``model`` inside a ``with`` block: ``with capture(model) as cap: model(...)``.

    attention_modules: module names (as in ``model.named_modules()``) or classes to watch besides the
        ones found (see the module docstring); by default the second element of their output is the
        weights ((batch, heads, queries, keys) or (heads, queries, keys)).
    weights_of: ``weights_of(module, inputs, output) -> tensor`` (``inputs``: the positional arguments)
        for the modules of ``attention_modules``, when their output does not carry the weights.
    blocks: the name (or the module) of the list of blocks whose hidden states to record; by default the
        ModuleList with the most children that each hold an attention module.

    Every hook is removed when the block ends, also on an exception; nothing changes the model's output.
    """
    return Capture(model, attention_modules, weights_of, blocks)


def record_local(variable: str) -> Callable[[Callable], Callable]:
    """Record the final value of local ``variable`` at each call of the decorated function made inside a
    :func:`capture` block on the same thread, into ``cap.locals[func.__qualname__]`` (in call order;
    tensors as float32 numpy copies). Outside a block the wrapper only checks whether one is open and
    calls the function directly; inside, ``sys.setprofile`` watches the call's return (chaining to any
    profile function already set, which is restored after). A call that raised keeps the value the
    variable had then, or None."""
    if not isinstance(variable, str) or not variable.isidentifier():
        raise ValueError(f"record_local: expected the name of a local variable, got {variable!r}")

    def decorate(func: Callable) -> Callable:
        code = getattr(func, "__code__", None)
        if code is None:
            raise TypeError(f"record_local({variable!r}): expected a Python function, got {func!r}")
        if code.co_flags & _GENERATOR_FLAGS:
            raise TypeError(f"record_local({variable!r}): {func.__qualname__} is a generator or coroutine; "
                            f"decorate a plain function")
        if variable not in code.co_varnames + code.co_cellvars:
            local_names = ", ".join(code.co_varnames + code.co_cellvars) or "none"
            raise ValueError(f"record_local({variable!r}): {func.__qualname__} has no local variable "
                             f"{variable!r} (its locals: {local_names})")

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            open_capture = _open_capture()
            if open_capture is None:
                return func(*args, **kwargs)
            return open_capture._call_recording(func, variable, args, kwargs)

        return wrapper

    return decorate
