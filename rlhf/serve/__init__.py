"""After training: serve the policy, collect feedback, turn it into preference data.

    rlhf serve configs/tiny_cpu.yaml --model runs/tiny_cpu/rl/model     # Ray Serve, loopback
    rlhf feedback export configs/tiny_cpu.yaml --out runs/tiny_cpu/feedback

`protocol` validates what clients send (pure), `db` stores prompts, answers and feedback through
SQLAlchemy (SQLite in WAL mode, or PostgreSQL), `app` is the Ray Serve application, `export`
writes the pairwise and ranked files the reward-model and DPO stages read.
"""
