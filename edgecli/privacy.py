"""Differentially private training: DP-SGD through Opacus, plugged into edgecli's one training loop.

``DPSGD`` is what ``training.fit(..., private=...)`` calls: it wraps the model in Opacus'
``GradSampleModule`` and the optimizer in its ``DPOptimizer`` (per-sample clipping to
``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm``), draws the batches with
Opacus' Poisson sampler (each training sample joins each step independently with probability
``batch_size / n``, which the accountant's guarantee assumes), and reads the ε spent so far from
Opacus' accountant after every epoch.

Needs the ``privacy`` extra (``pip install -e '.[privacy]'``); nothing here is imported by
``edgecli --help`` or by a run without ``train.privacy``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from edgecli.errors import ConfigError


def require_opacus():
    try:
        import opacus
    except ImportError:
        raise ConfigError("train.privacy needs Opacus, which is not installed",
                          hint="pip install -e '.[privacy]' (make install installs it)") from None
    return opacus


def check_model(model, pcfg, arch: str):
    """The model DP-SGD will train: BatchNorm is a one-line config error unless ``fix_batchnorm`` swaps it.

    Returns (model, notes). Uses Opacus' ``ModuleValidator`` both to find what it cannot train and
    to fix it (BatchNorm -> GroupNorm with gcd(32, C) groups).
    """
    require_opacus()
    from opacus.validators import ModuleValidator
    from torch import nn

    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    notes = []
    if bns:
        if not pcfg.fix_batchnorm:
            shown = ", ".join(bns[:3]) + (f" and {len(bns) - 3} more" if len(bns) > 3 else "")
            raise ConfigError(f"train.privacy: model '{arch}' has BatchNorm layers ({shown}), which mix the "
                              "samples of a batch so DP-SGD cannot bound them; set train.privacy.fix_batchnorm: "
                              "true (BatchNorm -> GroupNorm) or use a model without BatchNorm")
        if pcfg.norm_groups:
            bad = [n for n, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features % pcfg.norm_groups]
            if bad:
                raise ConfigError(f"train.privacy.norm_groups: {pcfg.norm_groups} does not divide the channels of "
                                  f"{bad[0]} ({dict(model.named_modules())[bad[0]].num_features})")
            model = ModuleValidator.fix(model, num_groups=pcfg.norm_groups)
        else:
            model = ModuleValidator.fix(model)
        # recorded in model_info: compress/bench rebuild the same architecture
        model._edgecli_norm_fix = pcfg.norm_groups or True
        notes.append(f"train.privacy.fix_batchnorm: replaced {len(bns)} BatchNorm layers by GroupNorm")
    no_inplace(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"train.privacy: model '{arch}' has layers DP-SGD cannot train "
                          f"({type(errors[0]).__name__}: {str(errors[0]).splitlines()[0][:160]})")
    return model, notes


def no_inplace(model) -> None:
    """Turn off in-place activations: Opacus' backward hooks forbid in-place ops on their outputs
    ("Output 0 of BackwardHookFunction is a view and is being modified inplace"), e.g. ReLU(inplace=True)
    after a hooked layer. The weights and the exported graph are the same."""
    for m in model.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False


class DPSGD:
    """One client's (or one centralised run's) DP-SGD state: noise, clipping, sampler, accountant.

    ``noise_multiplier`` fixed, or derived by Opacus from ``target_epsilon`` over ``total_epochs``
    (for a federated client: rounds x local_epochs, so ε stays within target even if it is picked
    every round). The accountant persists across ``attach`` calls, so a federated client that trains
    in several rounds keeps composing its ε.
    """

    def __init__(self, pcfg, *, total_epochs: int | None = None, noise_generator=None):
        require_opacus()
        from opacus import PrivacyEngine

        self.cfg = pcfg
        self.total_epochs = total_epochs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Secure RNG turned off": the README says what secure_mode is for
            try:
                self.engine = PrivacyEngine(accountant=pcfg.accountant, secure_mode=pcfg.secure_mode)
            except ImportError:
                raise ConfigError("train.privacy.secure_mode needs the torchcsprng package, which is not installed "
                                  "(Opacus draws its secure noise from it)") from None
        self.noise_multiplier: float | None = pcfg.noise_multiplier
        self.sample_rate: float | None = None
        self.noise_generator = None if pcfg.secure_mode else noise_generator
        self._loader = None

    def attach(self, model, optimizer, n: int, batch_size: int, epochs: int):
        """Wrap for DP-SGD; returns (module to call forward on, optimizer to step)."""
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        if batch_size >= n:
            raise ConfigError(f"train.batch_size: {batch_size} is not below the {n} training samples; Poisson "
                              "sampling needs batch_size < samples for DP-SGD to amplify privacy")
        no_inplace(model)
        # The loader yields sample *indices*: the loop slices its own arrays, Opacus only draws the batches.
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size)
        self.sample_rate = 1 / len(loader)
        if self.noise_multiplier is None:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.cfg.target_epsilon, target_delta=self.cfg.delta, sample_rate=self.sample_rate,
                epochs=self.total_epochs or epochs, accountant=self.engine.accountant.mechanism())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure_mode off" and the per-dataset notice on later rounds
            module, opt, dl = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.cfg.max_grad_norm, poisson_sampling=True, noise_generator=self.noise_generator)
        self._loader, self._module = dl, module
        return module, opt

    def close(self) -> None:
        """Take Opacus' hooks off the trained model (export and evaluation see the plain module)."""
        if getattr(self, "_module", None) is not None:
            self._module._close()
            self._module = None

    def batches(self, generator):
        """One epoch of Poisson-sampled index batches (Opacus' UniformWithReplacementSampler)."""
        sampler = self._loader.batch_sampler
        if not self.cfg.secure_mode:  # secure_mode keeps Opacus' CSPRNG for the sampling too
            sampler.generator = generator  # seeded per epoch by the loop: repeatable, and the same after --resume
        for idx in sampler:
            yield np.asarray(idx, dtype=np.int64)

    def epsilon(self) -> float:
        if not len(self.engine.accountant):
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta=self.cfg.delta))

    def spent(self) -> dict:
        return {"epsilon": round(self.epsilon(), 4)}

    def summary(self) -> dict:
        eps = self.epsilon()
        return {"epsilon": round(eps, 4), "delta": self.cfg.delta, "target_epsilon": self.cfg.target_epsilon,
                "noise_multiplier": None if self.noise_multiplier is None else round(float(self.noise_multiplier), 5),
                "max_grad_norm": self.cfg.max_grad_norm, "sample_rate": self.sample_rate,
                "accountant": self.cfg.accountant, "poisson_sampling": True, "mechanism": "DP-SGD (Opacus)",
                "finite": math.isfinite(eps)}

    def state_dict(self) -> dict:
        return {"accountant": self.engine.accountant.state_dict(), "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant"):
            self.engine.accountant.load_state_dict(state["accountant"])
        if state.get("noise_multiplier") is not None:
            self.noise_multiplier = float(state["noise_multiplier"])
