"""Square Attack (Andriushchenko et al. 2020), the gradient-free attack of AutoAttack, through the
authors' code (`pyautoattack.square.SquareAttack`).

Each query adds a random square of +-2 eps (Linf; a centred bump for L2) to the best image so far
and keeps it if the margin loss drops. No gradient is taken, so a model that masks its gradients
cannot hide from it: robust accuracy under Square well below PGD's says PGD was fooled.
"""

from __future__ import annotations

import torch
from torch import nn

from vptlab.attacks.authors import FloatLogits, draw_seed, import_pyautoattack, rng_devices
from vptlab.attacks.base import ATTACKS, Attack
from vptlab.attacks.pgd import check_budget
from vptlab.errors import ConfigError

AUTHORS_NORMS = {"linf": "Linf", "l2": "L2"}


@ATTACKS.register("square", gradient=False, trains=False)
class Square(Attack):
    """`n_queries` random-square queries per restart at budget eps (Linf or L2), margin loss.

    Defaults are AutoAttack's (p_init 0.8, 5,000 queries, one restart, the square-size schedule
    not rescaled to `n_queries`), so `square` alone is AutoAttack's last stage. A sample the
    attack does not fool comes back as the clean image; a fooled one as its adversarial image.
    The authors' code reseeds the global RNG, so it runs inside `torch.random.fork_rng`: the
    caller's stream is left untouched; `seed=None` draws the seed from that stream.

    Example:
        >>> attack = Square(eps=8 / 255, n_queries=1000)         # doctest: +SKIP
        >>> x_adv = attack(model.eval(), images, labels)         # doctest: +SKIP
    """

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        targeted: bool = False,
        amp: bool = False,
        seed: int | None = 0,
    ) -> None:
        check_budget(norm, eps)
        if n_queries < 1:
            raise ConfigError(f"square n_queries must be >= 1, got {n_queries}")
        if not 0 < p_init <= 1:
            raise ConfigError(f"square p_init must be in (0, 1], got {p_init}")
        if restarts < 1:
            raise ConfigError(f"attack restarts must be >= 1, got {restarts}")
        import_pyautoattack("square")  # fail when the attack is built, not mid-evaluation
        self.norm, self.eps, self.targeted, self.amp, self.seed = norm, eps, targeted, amp, seed
        self.n_queries, self.p_init, self.restarts = n_queries, p_init, restarts

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        square = import_pyautoattack("square", "pyautoattack.square")
        attack = square.SquareAttack(
            FloatLogits(model, self.amp),
            norm=AUTHORS_NORMS[self.norm],
            n_queries=self.n_queries,
            eps=self.eps,
            p_init=self.p_init,
            n_restarts=self.restarts,
            seed=draw_seed(self.seed),
            verbose=False,
            targeted=self.targeted,
            loss="margin",
            # AutoAttack's setting: the square-size schedule in absolute queries (it is tuned
            # for AutoAttack's 5,000), not stretched to n_queries.
            resc_schedule=False,
            device=x.device,
        )
        with torch.random.fork_rng(devices=rng_devices(x)):
            return attack.perturb(x, y)
