"""Reinforcement learning with verifiable rewards (``flopwise rl``): tasks, rewards, rollouts and the GRPO loss."""
