"""Running any method of a module through its wrapper's ``forward``.

DDP and FSDP only sync/shard correctly when the *wrapper* is called: its ``forward`` sets up the
gradient reducer or gathers the shards. A product that wants to run ``training_step`` (or any other
method) of the user's module therefore calls the wrapper, having pointed the inner module's
``forward`` at that method for exactly one call.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["call_through_forward"]


def call_through_forward(wrapper: nn.Module, module: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Calls ``module.<method>(*args, **kwargs)`` by way of ``wrapper(...)``.

    When ``wrapper is module`` the method is called directly, unless the module has forward hooks of
    its own: FSDP2's ``fully_shard`` makes the module its own wrapper, gathering its shards in hooks.
    """
    target = getattr(module, method)
    if wrapper is module and not (module._forward_pre_hooks or module._forward_hooks):
        return target(*args, **kwargs)

    had_instance_forward = "forward" in module.__dict__
    original_forward = module.forward

    def restore() -> None:
        if had_instance_forward:
            module.forward = original_forward
        else:
            module.__dict__.pop("forward", None)

    def redirected(*a: Any, **k: Any) -> Any:
        # Restore first so that ``method`` may itself call ``self(...)`` / ``self.forward``.
        restore()
        return target(*a, **k)

    module.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()
