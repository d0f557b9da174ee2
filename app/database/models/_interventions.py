"""What the live models' interventions share (``Vilt`` and ``Hf``): hooks that live for one re-run only,
the check of a head list, and the hook that zeroes heads at the input of an attention output projection.

Hooks are global state of a model that every request shares, so they are only ever registered inside
:func:`hooked`, which removes them on the way out whatever happens.
"""
import contextlib

import numpy as np

TOP_ANSWERS = 5  # answers listed in a re-run's prediction


@contextlib.contextmanager
def hooked(hooks):
    """Register ``[(module, kind, function), ...]`` for the ``with`` block only. ``kind``: ``"pre"`` (a
    forward pre-hook on the positional arguments), ``"pre_kwargs"`` (a forward pre-hook that gets and returns
    ``(args, kwargs)``: for modules called with keywords, such as a decoder's attention and its mask) or
    ``"post"`` (a forward hook on the output). Every hook is removed on the way out, also when the block (or a
    registration) raises."""
    handles = []
    try:
        for module, kind, function in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(function))
            elif kind == "pre_kwargs":
                handles.append(module.register_forward_pre_hook(function, with_kwargs=True))
            elif kind == "post":
                handles.append(module.register_forward_hook(function))
            else:
                raise ValueError(f"hook kind {kind!r}: expected pre, pre_kwargs or post")
        yield
    finally:
        for handle in handles:
            handle.remove()


def heads_by_layer(heads, n_layers: int, n_heads: int) -> dict:
    """{layer: [heads]} of ``[(layer, head), ...]`` (0-based), each checked against the model's size."""
    by_layer = {}
    for pair in heads:
        layer, head = pair
        if not (isinstance(layer, (int, np.integer)) and isinstance(head, (int, np.integer))
                and 0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"heads: ({layer!r}, {head!r}) is not a (layer, head) pair of this model "
                             f"({n_layers} layers x {n_heads} heads, 0-based)")
        by_layer.setdefault(int(layer), set()).add(int(head))
    return {layer: sorted(zeroed) for layer, zeroed in sorted(by_layer.items())}


def zeroing_heads(zeroed, head_dim: int):
    """A forward pre-hook for an attention output projection: its input is the heads' contexts side by side,
    ``(batch, n, heads * head_dim)``; the slices of the heads ``zeroed`` are set to 0 (transformers 5 has no
    ``head_mask``)."""
    def hook(_module, args):
        context = args[0].clone()
        for head in zeroed:
            context[..., head * head_dim:(head + 1) * head_dim] = 0
        return (context, *args[1:])
    return hook


def recording_context(store: list, index: int):
    """A forward pre-hook for an attention output projection that keeps its input (the heads' contexts,
    ``(batch, n, heads * head_dim)``) of the batch's first row in ``store[index]``: the clean run's head
    outputs that :func:`heads_per_row` patches in."""
    def hook(_module, args):
        store[index] = args[0][0].detach().clone()
    return hook


def heads_per_row(heads, head_dim: int, clean=None):
    """A forward pre-hook for an attention output projection that changes one head per row of the batch:
    row ``r`` gets head ``heads[r]``'s slice of the context zeroed (``clean`` None: a head ablation sweep)
    or replaced by ``clean``'s, the clean run's context ``(n, heads * head_dim)`` (activation patching of a
    head's output). One forward pass then sweeps every head of a layer."""
    def hook(_module, args):
        context = args[0].clone()
        for row, head in enumerate(heads):
            part = slice(head * head_dim, (head + 1) * head_dim)
            context[row, ..., part] = 0 if clean is None else clean[..., part]
        return (context, *args[1:])
    return hook
