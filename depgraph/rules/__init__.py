"""The channel rule table. One module per op family; importing this package registers them all.

To support a new op: add one function with ``@register(aten.<op>)`` to the family it belongs to
(or use the family's list, e.g. ``elementwise.UNARY``), and a sample in ``tests/test_rules.py``.
"""

from . import elementwise, layers, recurrent, reduce, shape  # noqa: F401 - registration side effects
from .registry import LayerUse, RuleContext, lookup, register, registered_ops

__all__ = ["LayerUse", "RuleContext", "lookup", "register", "registered_ops"]
