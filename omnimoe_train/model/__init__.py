"""What the model is: the megatron-core GPT (``gpt``), the OmniMoE MLP (``omnimoe_layer``), its
Cartesian router (``router``), attention (``attention``) and expert statistics (``expert_stats``).
How it is parallelised lives in ``omnimoe_train.parallel``; how it is trained in ``engine``."""
