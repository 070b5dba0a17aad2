"""One ``nn.Module`` per head of the heads table (docs/heads.md), all :class:`MarginHead`."""

from .adaface import AdaFaceLoss
from .arcface import ArcFaceLoss
from .base import MarginHead, SpecHead
from .circle import CircleLoss
from .combined import CombinedMarginLoss
from .cosface import CosFaceLoss
from .cs_softmax import CSSoftmaxLoss
from .curricularface import CurricularFaceLoss
from .lsoftmax import LSoftmaxLoss
from .magface import MagFaceLoss
from .normface import NormFaceLoss
from .so_softmax import SOSoftmaxLoss
from .softmax import SoftmaxLoss
from .sphereface import SphereFaceLoss
from .subcenter_arcface import SubCenterArcFaceLoss

__all__ = [
    "AdaFaceLoss", "ArcFaceLoss", "CSSoftmaxLoss", "CircleLoss", "CombinedMarginLoss", "CosFaceLoss",
    "CurricularFaceLoss", "LSoftmaxLoss", "MagFaceLoss", "MarginHead", "NormFaceLoss", "SOSoftmaxLoss",
    "SoftmaxLoss", "SpecHead", "SphereFaceLoss", "SubCenterArcFaceLoss",
]
