"""`MarginHead`, the base of every head module, and `SpecHead`, the base of the heads
whose spec is one constant built by their factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import _checks
from ..functional import BackendName, Reduction, margin_cross_entropy
from ..logits import margin_free_logits
from ..ops import snapshot
from ..spec import MarginSpec

__all__ = ["MarginHead", "SpecHead"]


def _positive_int(name: str, value: int) -> int:
    try:
        return _checks.positive_integer(name, value)
    except TypeError as e:
        raise ValueError(str(e)) from None


class MarginHead(nn.Module):
    """A classification head: owns the class weights and maps ``(embeddings, labels)``
    to the margin-softmax loss through the fused operation.

    Subclasses define :meth:`spec` (the head as a :class:`MarginSpec`, from the current
    state) and, if stateful, :meth:`update_state` (called once per training forward,
    before the loss, with detached inputs).

    Attributes:
        weight: (num_classes * num_subcenters, embedding_size) class weights
            (``nn.Linear.weight`` layout), initialized N(0, 0.01) as InsightFace does.
        bias: (num_classes,) or None.
        step: int64 scalar buffer, training forwards seen so far (annealed margins).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        num_subcenters: int = 1,
        bias: bool = False,
        reduction: Reduction = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        return_accuracy: bool = False,
        backend: BackendName = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.embedding_size = _positive_int("embedding_size", embedding_size)
        self.num_subcenters = _positive_int("num_subcenters", num_subcenters)
        self.reduction = _checks.reduction(reduction)
        self.ignore_index = _checks.integer("ignore_index", ignore_index)
        self.label_smoothing = _checks.label_smoothing(label_smoothing)
        self.return_accuracy = bool(return_accuracy)
        self.backend = _checks.backend(backend)
        factory = {"dtype": dtype or torch.float32, "device": device}
        self.weight = nn.Parameter(torch.empty(num_classes * num_subcenters, embedding_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_classes, **factory))
        else:
            self.register_parameter("bias", None)
        # A buffer, not a Python int: it travels with state_dict(), and a compiled
        # training step updates it in the graph instead of recompiling for every value.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.reset_parameters()

    #: the initial value of each state buffer (see :meth:`materialize_state`)
    _STATE_INIT: dict[str, float] = {"step": 0}

    def materialize_state(self, device: torch.device | str) -> None:
        """Give the state buffers that live on the meta device real storage on ``device``,
        at their initial values; the weight stays where it is. For a head built with
        ``device='meta'`` whose spec and state (not weight) another module uses:
        :class:`fused_margin.distributed.ShardedMarginLoss`."""
        for name, buffer in list(self._buffers.items()):
            if buffer is not None and buffer.is_meta:
                value = torch.full((), self._STATE_INIT[name], dtype=buffer.dtype, device=device)
                self.register_buffer(name, value.expand(buffer.shape).clone())

    def _apply(self, fn, recurse=True):
        # .half(), .bfloat16(), .double(), .to(dtype) convert the weight (and bias) but not
        # the running statistics: an EMA with momentum 0.01 stalls in 16-bit floats. The
        # state follows the device only, so a head cast later holds the same state
        # dtype (fp32) as one built with ``dtype=``.
        state = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in state.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                kept = new.to(old.dtype) if old.is_meta or new.is_meta else old.to(new.device, copy=True)
                self._buffers[name] = kept
        return self

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def spec(self) -> MarginSpec:
        raise NotImplementedError

    def update_state(self, embeddings: Tensor, labels: Tensor) -> None:
        """Stateful heads update their statistics here (training only)."""

    def update_state_from_target_cos(self, target_cos: Tensor, valid: Tensor) -> bool:
        """For a head whose statistics need only the rows' target cosines (B,) (``valid``:
        rows with a target), which a class-sharded head computes from the whole weight:
        updates them and returns True. False (the default): the statistics need the
        embeddings, through :meth:`update_state`."""
        return False

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Loss for (B, D) embeddings and (B,) integer labels (and the top-1 accuracy
        when ``return_accuracy``)."""
        self._check_inputs(embeddings, labels)
        if self.training:
            with torch.no_grad():
                self.update_state(embeddings.detach(), labels)
        result = margin_cross_entropy(
            embeddings,
            self.weight,
            labels,
            self.spec(),
            bias=self.bias,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            return_accuracy=self.return_accuracy,
            backend=self.backend,
            # the backward must see this step's value, not the buffer that the increment
            # below mutates (see ops.snapshot)
            step=snapshot(self.step),
        )
        if self.training:
            with torch.no_grad():
                self.step.add_(1)
        return result

    def _check_inputs(self, embeddings: Tensor, labels: Tensor | None = None) -> None:
        # Before anything reads them (the state update runs first): the errors name the
        # arguments the user passed, not the weight they are multiplied with.
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if labels is not None and not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            shape = "(" + ", ".join(str(s) for s in embeddings.shape) + ")"
            raise ValueError(
                f"embeddings must have shape (batch, embedding_size={self.embedding_size}), got {shape}"
            )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """Margin-free logits (B, num_classes) for inference. Materializes B x C."""
        self._check_inputs(embeddings)
        return margin_free_logits(embeddings, self.weight, self.spec(), self.bias)

    def extra_repr(self) -> str:
        k = f", num_subcenters={self.num_subcenters}" if self.num_subcenters > 1 else ""
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}{k}, "
            f"spec={self.spec()!r}, backend={self.backend!r}"
        )


_Parameter = inspect.Parameter


def _keyword_only(signature: inspect.Signature) -> dict[str, _Parameter]:
    return {name: p for name, p in signature.parameters.items() if p.kind is _Parameter.KEYWORD_ONLY}


#: MarginHead's own keyword arguments (after ``num_classes`` and ``embedding_size``)
_HEAD_KEYWORDS = _keyword_only(inspect.signature(MarginHead.__init__))
#: the attributes every head sets on itself, which a margin keyword must not replace
_HEAD_ATTRIBUTES = {"num_classes", "embedding_size", "weight", "bias", "step", "training"}


class SpecHead(MarginHead):
    """A head whose spec is built by the :class:`MarginSpec` factory named in the class
    statement, from the head's margin keywords.

    The margin keywords, their defaults and their checks are the factory's, defined once:
    the head takes them keyword-only, with its own constructor's keywords (if it defines
    one) and :class:`MarginHead`'s, and keeps each as an attribute (``head.scale``,
    ``head.margin``). Setting one later rebuilds the spec at once, through the factory's
    checks, so the next forward uses it (a margin schedule); a value the factory refuses
    raises there, naming the attribute, and the head keeps its old value.
    ``num_subcenters``, which fixes the weight's shape, cannot change.
    ``inspect.signature`` and ``help()`` show the whole list::

        class CosFaceLoss(SpecHead, factory=cosface_spec): ...
        class SubCenterArcFaceLoss(ArcFaceLoss, num_subcenters=3): ...

    Class keywords: ``factory``; ``supplied``, the factory's arguments the head fills in
    itself (AdaFace's ``norm_scaler``: see :meth:`make_spec`), which users do not pass;
    ``renames``, ``{factory argument: head keyword}`` where the head's name differs; any
    other keyword overrides a default (of the factory or of :class:`MarginHead`) for this
    head. A margin keyword that :class:`MarginHead` also takes (``num_subcenters``) goes to
    both. A class with no factory of its own or inherited is an abstract base.
    """

    #: the spec factory; the head's margin keywords (head name -> parameter with this
    #: head's default), and the factory's name of each
    _factory: ClassVar[Callable[..., MarginSpec]]
    _margin_keywords: ClassVar[dict[str, _Parameter]] = {}
    _factory_names: ClassVar[dict[str, str]] = {}
    _renames: ClassVar[dict[str, str]] = {}
    #: defaults of MarginHead's keywords that this head overrides (SoftmaxLoss: ``bias=True``)
    _head_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(
        cls,
        *,
        factory: Callable[..., MarginSpec] | None = None,
        supplied: tuple[str, ...] = (),
        renames: dict[str, str] | None = None,
        **defaults: Any,
    ) -> None:
        super().__init_subclass__()
        cls._renames = {**cls._renames, **(renames or {})}
        if factory is not None:
            params = inspect.signature(factory).parameters.values()
            if any(p.kind in (_Parameter.VAR_POSITIONAL, _Parameter.VAR_KEYWORD, _Parameter.POSITIONAL_ONLY)
                   for p in params):
                raise TypeError(f"{cls.__name__}: the factory {factory.__name__} must take named arguments only")
            cls._factory = staticmethod(factory)
            named = {cls._renames.get(p.name, p.name): p for p in params if p.name not in supplied}
            cls._factory_names = {name: p.name for name, p in named.items()}
            cls._margin_keywords = {
                name: p.replace(name=name, kind=_Parameter.KEYWORD_ONLY) for name, p in named.items()
            }
            taken = sorted(n for n in cls._margin_keywords
                           if n not in _HEAD_KEYWORDS and (n in _HEAD_ATTRIBUTES or hasattr(cls, n)))
            if taken:
                raise TypeError(f"{cls.__name__}: the keywords {taken} of {factory.__name__} would hide attributes "
                                "of the head; rename them (renames={factory argument: head keyword})")
        elif not hasattr(cls, "_factory"):
            return  # an abstract base
        unknown = sorted(set(defaults) - set(cls._margin_keywords) - set(_HEAD_KEYWORDS))
        if unknown:
            raise TypeError(f"{cls.__name__}: {unknown} are not keywords of {cls._factory.__name__} or MarginHead")
        cls._margin_keywords = {
            name: p.replace(default=defaults.get(name, p.default)) for name, p in cls._margin_keywords.items()
        }
        cls._head_defaults = {
            **cls._head_defaults,
            **{k: v for k, v in defaults.items() if k in _HEAD_KEYWORDS and k not in cls._margin_keywords},
        }
        own = _keyword_only(inspect.signature(cls.__init__)) if "__init__" in cls.__dict__ else {}
        head = [p.replace(default=cls._head_defaults.get(name, p.default))
                for name, p in _HEAD_KEYWORDS.items() if name not in cls._margin_keywords]
        positional = [_Parameter(name, _Parameter.POSITIONAL_OR_KEYWORD, annotation="int")
                      for name in ("num_classes", "embedding_size")]
        cls.__signature__ = inspect.Signature(
            [*positional, *cls._margin_keywords.values(), *own.values(), *head], return_annotation="None"
        )

    def __init__(self, num_classes: int, embedding_size: int, **keywords: Any) -> None:
        keywords = {**self._head_defaults, **keywords}
        margin = {}
        for name, p in self._margin_keywords.items():
            value = keywords.setdefault(name, p.default) if name in _HEAD_KEYWORDS else keywords.pop(name, p.default)
            if value is _Parameter.empty:
                raise TypeError(f"{type(self).__name__}() needs the keyword argument {name!r}")
            margin[name] = value
        unknown = sorted(set(keywords) - set(_HEAD_KEYWORDS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}")
        # the factory checks the margin keywords before the weight is allocated
        self._spec = self.make_spec(**{self._factory_names[name]: value for name, value in margin.items()})
        super().__init__(num_classes, embedding_size, **keywords)
        for name, value in margin.items():
            if name not in _HEAD_KEYWORDS:
                setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self._margin_set = True  # from here on, a margin keyword set on the head rebuilds the spec

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._margin_keywords and self.__dict__.get("_margin_set", False):
            self._set_margin_keyword(name, value)
        else:
            super().__setattr__(name, value)

    def _set_margin_keyword(self, name: str, value: Any) -> None:
        if name in _HEAD_KEYWORDS:
            raise AttributeError(
                f"{type(self).__name__}.{name} cannot change after construction (the weight's shape depends on "
                f"it); build a new head"
            )
        old = self.__dict__[name]
        super().__setattr__(name, tuple(value) if isinstance(value, list) else value)
        try:
            self._refresh_spec()
        except (TypeError, ValueError) as e:
            super().__setattr__(name, old)
            raise type(e)(f"{type(self).__name__}.{name} = {value!r} is refused: {e}") from None

    def make_spec(self, **arguments: Any) -> MarginSpec:
        """The spec from the factory's ``arguments`` (the margin keywords under the
        factory's names). A head with ``supplied`` arguments adds them here."""
        return self._factory(**arguments)

    def margin_arguments(self) -> dict[str, Any]:
        """The factory's arguments as the head holds them now (under the factory's names)."""
        return {self._factory_names[name]: getattr(self, name) for name in self._margin_keywords}

    def _refresh_spec(self) -> None:
        """The spec from the margin keywords as the head holds them now."""
        self._spec = self.make_spec(**self.margin_arguments())

    def spec(self) -> MarginSpec:
        return self._spec
