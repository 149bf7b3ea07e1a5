"""PPO for RLHF (docs/paper.md Sec. 2-3).

``core``: one pure function per equation; ``config``: :class:`~rlhf_lite.ppo.config.PPOConfig` and the presets
as data; ``experience``: scoring a rollout into a training buffer; ``monitors``: the collapse detector;
``trainer``: the loop (``run_setup``: what it is given); ``checkpoint``: durable checkpoints; ``distributed``:
the loop on several processes (``accelerate launch``); ``stage``: the PPO stage of every profile.
"""
