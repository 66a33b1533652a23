"""The ML pieces: loading and saving models, the sampler, preference pairs, the proxy reward, policy init and
reference, co-training, the RM objectives and the policy-update methods. Imports only rlhf.core."""
