"""Beyond PPO, in the same world: DPO, GRPO and best-of-n on the same model stack, measured by the gold judge.

* :mod:`~rlhf_lite.beyond.dpo`: Direct Preference Optimization (Rafailov et al. 2023) on the world's
  preference pairs; no reward model, no sampling during training;
* :mod:`~rlhf_lite.beyond.grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) against
  the reward model; group-relative advantages instead of a critic;
* :mod:`~rlhf_lite.beyond.bon`: best-of-n sampling against the reward model, the no-training baseline of
  Gao et al. 2023's over-optimization study;
* :mod:`~rlhf_lite.beyond.measure`: the one measurement every method is compared by (gold score, KL to the
  reference and RM reward of the same samples);
* :mod:`~rlhf_lite.beyond.sweep`: the three-seed comparison of notebook 06, with vanilla PPO and PPO-max.

Every policy is a LoRA adapter on the SFT model, and the reference is that model with adapters off.
"""
