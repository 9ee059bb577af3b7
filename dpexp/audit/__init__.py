"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, "Privacy Auditing
with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846); docs/audit.md.

python -m dpexp.audit method=rgp clipping=functorch audit.canaries=2000

1. ``m`` canaries; each is included in the private data set with probability 1/2 (S_i = ±1),
   drawn from the audit's own random stream (:mod:`~dpexp.audit.canaries`).
2. Two kinds of canary (``audit.canary_type``):

   - ``gradient`` (:mod:`~dpexp.audit.gradient_canaries`): the white-box Dirac gradient
     canaries of Nasr et al., "Tight Auditing of Differentially Private Machine Learning"
     (USENIX Security 2023). Each is a per-sample gradient on its own trainable coordinate,
     injected into the DP step and clipped by ``clip_materialized``, *around* the clipping
     engine; the auditor reads that coordinate of the released gradient. It certifies the
     noise, the sample rate, the methods' hooks and the accountant, not the engines.
   - ``input`` (:mod:`~dpexp.audit.input_canaries`): out-of-distribution examples, each
     labelled with a class of its own added to the model's output layer (its canary row),
     appended to the private training data: the run's Poisson sampler draws them and its
     clipping engine clips them with the batch. The auditor stays white-box on the released
     updates: per step it scores each canary by the alignment of its row of the released
     noisy gradient with that canary's clipped gradient there, computed at the current
     parameters by ``torch.func`` apart from dpexp's engines. It also certifies the engine's
     clip factors and its clipping of the output layer.

3. Each step gives one value x_t per canary (a steps × canaries series). Two scores:
   ``sum`` = Σ_t x_t (best when noise dominates) and ``detrended`` = Σ_t (x_t − the median of
   x over the steps around t), which removes what the real data contribute slowly, so the
   canary's jumps of C/B stand out when noise is small or off.
4. It guesses "in" for the r/2 highest scores and "out" for the r/2 lowest; the number of
   correct guesses is turned into a lower bound on ε that holds with the stated confidence
   (:func:`~dpexp.audit.bound.epsilon_lower_bound`). Both scores and several r are tried,
   Bonferroni-corrected.
"""

from dpexp.audit.bound import Guesses, epsilon_lower_bound, guess_membership, one_run_p_value
from dpexp.audit.canaries import Canaries, detrended_scores, summed_scores
from dpexp.audit.gradient_canaries import GradientCanaries
from dpexp.audit.input_canaries import InputCanaries
from dpexp.audit.run import AUDIT_FILE, audit, main

__all__ = [
    "AUDIT_FILE",
    "Canaries",
    "GradientCanaries",
    "Guesses",
    "InputCanaries",
    "audit",
    "detrended_scores",
    "epsilon_lower_bound",
    "guess_membership",
    "main",
    "one_run_p_value",
    "summed_scores",
]
