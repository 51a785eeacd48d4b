"""The lean core that runs on the Jetson: backends, sources, policy, run loop.

Never imports torch at module level, nor cloud_train or distill.
"""
