"""rlhf_lite: a small reproduction of Secrets of RLHF in LLMs Part I: PPO."""
