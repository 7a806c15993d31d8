"""What is not one training run: tools around asmae_minimal.py (imports nothing of it).

    profile     --benchmark N --profile: where a step's GPU time goes, by kernel group
"""
