"""Key bindings: one table of shortcuts, bound on the viewer and on the plugin's layers.

Each key calls a method of the controller (`MedSAMWidget`) by name, the same method the panel's
button calls. Bound on the plugin's layers too, the keys win over napari's single-letter layer
shortcuts there.
"""

from __future__ import annotations

# key -> (method name, arguments, description)
SHORTCUTS = {
    "S": ("segment_slice", (), "segment this slice from its prompts"),
    "A": ("accept", (), "accept the slice result"),
    "P": ("propagate", ("both",), "propagate up and down"),
    "U": ("propagate", ("up",), "propagate up (towards higher slice numbers)"),
    "D": ("propagate", ("down",), "propagate down (towards lower slice numbers)"),
    "X": ("stop_here", (), "stop the object at this slice"),
    "C": ("clear_object", (), "clear the current object"),
    "N": ("add_object", (), "new object"),
    "G": ("review_next", (), "go to the least confident propagated slice not yet reviewed"),
    "Control-Z": ("undo", (), "undo"),
    "Control-Shift-Z": ("redo", (), "redo"),
}


def shortcuts_text() -> str:
    """All shortcuts in one line (the panel's tooltip)."""
    return ", ".join(f"{k}: {d}" for k, (_, _, d) in SHORTCUTS.items())


class KeyBindings:
    """Binds `SHORTCUTS` to `handler`'s methods on napari targets (the viewer, layers), and unbinds them."""

    def __init__(self, handler):
        self.handler = handler
        self._bound: list[tuple[object, str]] = []

    def bind(self, target) -> None:
        for key, (method, args, _) in SHORTCUTS.items():
            def callback(_target=None, _m=method, _a=args):
                getattr(self.handler, _m)(*_a)

            target.bind_key(key, callback, overwrite=True)
            self._bound.append((target, key))

    def unbind_all(self) -> None:
        for target, key in self._bound:
            try:
                target.bind_key(key, None)
            except Exception:  # a layer or viewer already gone
                pass
        self._bound.clear()
