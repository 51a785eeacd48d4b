"""Backdoor attacks and the scans that catch them.

Modules (import the one you need; this package imports nothing heavy by itself):

- ``triggers``: the trigger description (:class:`~cloud_train.backdoor.triggers.Trigger`) and
  how it is stamped on uint8 NHWC RGB images or float NCHW tensors (BadNets patch, blended).
- ``poison``: poisoning a training set at a given rate and measuring attack success rate.
- ``features``: penultimate-layer activations (the input of the last ``nn.Linear``) and their
  robust whitening per class.
- ``activation_clustering``: Chen et al. 2018 scan (2-means per class after dimension reduction).
- ``spectral``: Tran et al. 2018 spectral signatures (top singular vector outlier scores).
- ``retrain``: remove flagged examples and retrain from scratch with the same config.
- ``neural_cleanse`` / ``unlearn``: Wang et al. 2019 trigger reverse-engineering and unlearning.
- ``verdict``: the kit's backdoor verdict, a rule over the three scans' flags, calibrated on
  some seeds (a frozen JSON rule that records them) and measured on others.
- ``report``: text, markdown and chart of a ``roadshield redteam backdoor`` result.
"""
