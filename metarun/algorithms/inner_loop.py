"""Inner-loop update rules: gradient steps on one task (or on a grouped call's tasks at once).

:func:`inner_loop` takes SGD or Adam steps with ``torch.func.grad`` (or plain
autograd, :func:`autograd_grad`) so that they can be differentiated through
(second order), cut (first order), or just run (evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.func import grad
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from metarun.errors import ConfigError
from metarun.models.norm import differentiated_twice

Params = dict[str, Any]  # possibly nested dicts of tensors (a pytree)

INNER_OPTIMIZERS = ("sgd", "adam")


def autograd_grad(fn: Callable, has_aux: bool = False, create_graph: bool = False) -> Callable:
    """``torch.func.grad``'s contract (gradient of ``fn`` with respect to its first argument) with plain autograd.

    Outside any ``vmap`` (the grouped strategy) autograd is exact, and nesting
    ``autograd.grad(create_graph=True)`` is faster than nesting ``torch.func.grad``
    for second-order MAML on Conv4 (``docs/performance.md``). ``create_graph``
    keeps the result differentiable for an enclosing gradient; gradients are
    taken even under ``torch.no_grad`` (evaluation), as ``torch.func.grad`` does.
    """

    def wrapper(x, *args):
        with torch.enable_grad(), differentiated_twice(create_graph):
            leaves, spec = tree_flatten(x)
            leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in leaves]
            out = fn(tree_unflatten(leaves, spec), *args)
            loss, aux = out if has_aux else (out, None)
            grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
        grads = tree_unflatten(list(grads), spec)
        return (grads, aux) if has_aux else grads

    return wrapper


def inner_loop(
    loss_fn: Callable[[Params, int], tuple[torch.Tensor, Any]],
    params: Params,
    lrs: Params | float,
    steps: int,
    first_order: bool,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.0, 0.999),
    eps: float = 1e-8,
    autograd: bool = False,
    moments: tuple[Params, Params, torch.Tensor] | None = None,
) -> tuple[Params, Any, tuple[Params, Params] | None]:
    """``steps`` gradient steps on ``loss_fn(params, step) -> (loss, aux)`` for one task.

    ``lrs`` is one float or a pytree like ``params`` (Meta-SGD's learned
    per-parameter rates). Gradients are taken with ``torch.func.grad``, so an
    enclosing ``grad`` differentiates through the steps (second order) unless
    ``first_order``, which detaches them (FOMAML; Reptile never differentiates).
    ``adam`` starts from zero moments, or from ``moments`` (first, second, steps
    already taken: Reptile's carried state). ``autograd`` takes the gradients with
    :func:`autograd_grad` instead (grouped calls, never under ``vmap``).
    Returns the adapted parameters, the ``aux`` of the last step (``None``
    for zero steps) and Adam's moments after the last step (``None`` for SGD).
    """
    if optimizer not in INNER_OPTIMIZERS:
        raise ConfigError(f"inner optimizer {optimizer}: valid values are {', '.join(INNER_OPTIMIZERS)}")
    if not isinstance(lrs, dict):
        lrs = tree_map(partial(_constant, lrs), params)
    b1, b2 = betas
    m = v = None
    taken = 0
    if optimizer == "adam" and moments is None:
        m, v = tree_map(torch.zeros_like, params), tree_map(torch.zeros_like, params)
    elif optimizer == "adam":
        m, v = (tree_map(_expand_as, carried, params) for carried in moments[:2])
        taken = moments[2].to(tree_flatten(v)[0][0].dtype)  # a tensor: no host sync; bias corrections in the moments' precision
    aux = None
    take_grad = partial(autograd_grad, create_graph=not first_order) if autograd else grad
    for step in range(steps):
        g, aux = take_grad(loss_fn, has_aux=True)(params, step)
        if first_order:
            g = tree_map(torch.Tensor.detach, g)
        if optimizer == "adam":
            m, v, g = _adam(m, v, g, b1, b2, eps, taken + step + 1)
        params = tree_map(_sgd_step, params, lrs, g)
    return params, aux, None if m is None else (m, v)


def _constant(value, _):
    return value


def _expand_as(shared, per_task):
    return shared.expand_as(per_task)


def _adam(m: Params, v: Params, g: Params, b1: float, b2: float, eps: float, t) -> tuple[Params, Params, Params]:
    """Adam's moments after gradient ``g`` at step ``t``, and its direction, for every tensor at once.

    ``torch._foreach_*`` dispatches each operation once for all tensors rather than once per tensor
    (``docs/performance.md``). With ``b1 = 0`` (Reptile's) the first moment is the gradient itself and
    its bias correction is 1, a division skipped.
    """
    grads, spec = tree_flatten(g)
    firsts = grads if b1 == 0 else _foreach("lerp", tree_flatten(m)[0], grads, 1 - b1)
    seconds = _foreach("lerp", tree_flatten(v)[0], _foreach("mul", grads, grads), 1 - b2)
    denominators = _foreach("add", _foreach("sqrt", _foreach("div", seconds, 1 - b2**t)), eps)
    directions = _foreach("div", firsts if b1 == 0 else _foreach("div", firsts, 1 - b1**t), denominators)
    return tuple(tree_unflatten(list(x), spec) for x in (firsts, seconds, directions))


def _foreach(op: str, *args):
    """``torch._foreach_<op>`` over the lists in ``args`` (other arguments are shared), or, under
    ``torch.func`` transforms, which have no rule for those, ``torch.<op>`` tensor by tensor."""
    lists = [a for a in args if isinstance(a, list)]
    if not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for a in lists for t in a):
        return getattr(torch, f"_foreach_{op}")(*args)
    return [getattr(torch, op)(*(a[i] if isinstance(a, list) else a for a in args)) for i in range(len(lists[0]))]


def _sgd_step(p, lr, g):
    return p - lr * g
