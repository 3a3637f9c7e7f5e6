"""AutoAttack (Croce & Hein 2020) through the authors' code (`pyautoattack.AutoAttack`): the
parameter-free ensemble, each attack run on the samples the previous ones left correct.

`version` is theirs, with their iterations, targets and queries: `standard` is APGD-CE and APGD-T
(100 iterations, 9 target classes), FAB-T and Square (5,000 queries); `plus` adds restarts,
APGD-DLR and untargeted FAB; `rand` is APGD-CE and APGD-DLR with 20 EOT samples per step, for
randomized defenses; `custom` runs the list in `attacks`. Their checks for evaluations that may not
be reliable (a randomized or dynamic defense, probabilities instead of logits, zero gradients,
too few classes, Square stronger than the gradient attacks) are collected in `AutoAttack.flags`
for the evaluation to record.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vptlab.attacks.authors import FloatLogits, draw_seed, import_pyautoattack, rng_devices
from vptlab.attacks.base import ATTACKS, Attack
from vptlab.attacks.pgd import check_budget
from vptlab.errors import ConfigError

VERSIONS = ("standard", "plus", "rand", "custom")
STAGES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AUTHORS_NORMS = {"linf": "Linf", "l2": "L2"}
LOGGER = "auto-attack"  # the authors' logger: their checks warn through it
DLR_STAGES = {"apgd-dlr", "apgd-t"}  # the DLR loss ranks the 3rd and 4th largest logits


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def authors_messages(messages: list[str]) -> Iterator[None]:
    """Append the warnings the authors' code logs (or `warnings.warn`s) to `messages`.

    They still reach the user's handlers; other warnings raised inside are re-issued.
    """
    logger = logging.getLogger(LOGGER)
    handler, level = _Collect(messages), logger.level
    if not logger.isEnabledFor(logging.WARNING):  # a quieted logger would hide the checks
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    trace = sys.gettrace()  # their dynamic-defense check ends with sys.settrace(None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        sys.settrace(trace)
        logger.removeHandler(handler)
        logger.setLevel(level)
    for w in caught:
        if w.category is Warning:  # the checks warn with the bare Warning class
            messages.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@ATTACKS.register("autoattack", gradient=True, trains=False)
class AutoAttack(Attack):
    """The authors' AutoAttack `version` at budget eps (Linf or L2), seeded.

    Returns adversarial images for the whole batch: a sample the ensemble does not fool, or one
    misclassified already, comes back as the clean image. The model is attacked in the modes it
    came in (evaluation hands it over in eval mode) and fp32 logits; modes and `requires_grad`
    are restored afterwards. The authors' code reseeds the global RNG, so it runs inside
    `torch.random.fork_rng`: the caller's stream is left untouched; `seed=None` draws the seed
    from it. `flags` accumulates the authors' check messages over every batch, each once.

    Example:
        >>> attack = AutoAttack(eps=8 / 255)                     # doctest: +SKIP
        >>> x_adv = attack(model.eval(), images, labels)         # doctest: +SKIP
        >>> robust = (model(x_adv).argmax(1) == labels).float().mean()  # doctest: +SKIP
        >>> attack.flags                                         # doctest: +SKIP
    """

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        version: str = "standard",
        attacks: list[str] | None = None,
        amp: bool = False,
        seed: int | None = 0,
    ) -> None:
        check_budget(norm, eps)
        if version not in VERSIONS:
            raise ConfigError(f"autoattack version must be one of {', '.join(VERSIONS)}, "
                              f"got {version!r}")  # fmt: skip
        if version == "custom":
            unknown = [a for a in attacks or [] if a not in STAGES]
            if not attacks or unknown:
                raise ConfigError(
                    f"autoattack version custom needs attacks from {', '.join(STAGES)}, "
                    f"got {attacks!r}"
                )
        elif attacks is not None:
            raise ConfigError(f"autoattack attacks are set by version {version!r}; "
                              "give them with version custom")  # fmt: skip
        import_pyautoattack("autoattack")  # fail when the attack is built, not mid-evaluation
        self.norm, self.eps, self.amp, self.seed = norm, eps, amp, seed
        self.version, self.attacks = version, list(attacks) if attacks else None
        self.flags: list[str] = []

    def authors(self, model: nn.Module, device: torch.device, seed: int = 0) -> Any:
        """The authors' `AutoAttack` object this attack runs (fp32 logits of `model`)."""
        pyautoattack = import_pyautoattack("autoattack")
        return pyautoattack.AutoAttack(
            FloatLogits(model, self.amp),
            attacks=self.attacks,
            device=device,
            eps=self.eps,
            norm=AUTHORS_NORMS[self.norm],
            seed=seed,
            version=self.version,
        )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seed = draw_seed(self.seed)
        messages: list[str] = []
        with torch.random.fork_rng(devices=rng_devices(x)), authors_messages(messages):
            attack = self.authors(model, x.device, seed)
            with torch.no_grad():
                n_classes = attack.get_logits(x[:1]).shape[1]
            messages += self._fit_targets(attack, n_classes)
            # Their dynamic-defense check counts calls in a module-level tally it never resets:
            # one model that calls backward would flag every model after it.
            checks = import_pyautoattack("autoattack", "pyautoattack.checks")
            checks.funcs.update(dict.fromkeys(checks.funcs, 0))
            x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
        self.flags += [m for m in dict.fromkeys(messages) if m not in self.flags]
        return x_adv

    def _fit_targets(self, attack: Any, n_classes: int) -> list[str]:
        """Fewer target classes where the model has fewer than 10 classes (the authors' 9 would
        index past the logits); refused where their DLR losses cannot be formed at all."""
        stages = set(attack.attacks_to_run)
        if n_classes < 4 and stages & DLR_STAGES:
            raise ConfigError(
                f"autoattack: the model has {n_classes} classes; APGD-DLR and APGD-T need at least "
                "4: use version custom with attacks such as [apgd-ce, fab, square]"
            )
        wanted = max(attack.apgd_targeted.n_target_classes, attack.fab.n_target_classes)
        if wanted <= n_classes - 1 or not stages & {"apgd-t", "fab-t"}:
            return []
        attack.apgd_targeted.n_target_classes = attack.fab.n_target_classes = n_classes - 1
        return [f"the model has {n_classes} classes: APGD-T and FAB-T target {n_classes - 1} "
                f"classes instead of the authors' {wanted}"]  # fmt: skip
