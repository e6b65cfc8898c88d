"""Tools: the registry, the demo tools, and the activity that runs any of them."""

from keel.activities.tools.execute import ToolActivities
from keel.activities.tools.loader import catalog
from keel.activities.tools.registry import REGISTRY, Tool, ToolContext, ToolError, tool

__all__ = ["REGISTRY", "Tool", "ToolActivities", "ToolContext", "ToolError", "catalog", "tool"]
