"""TensorRT: the static op check, optimization profiles from user limits, engine building.

Only `build` (and the native backend) import tensorrt, lazily; everything else runs anywhere.
"""

from q3vl.tensorrt.profiles import Limits, Profile, profiles
from q3vl.tensorrt.support import SupportReport, check_graph

__all__ = ["Limits", "Profile", "SupportReport", "check_graph", "profiles"]
