"""What :class:`~d2ema.EMA` delegates to: how the averages are stored and updated.

* :mod:`~d2ema.averaging.state`: which tensors of a model are tracked, and their storage layout;
* :mod:`~d2ema.averaging.update`: the update kernels (one :class:`~d2ema.averaging.update.Binding`
  per group of tensors);
* :mod:`~d2ema.averaging.flat`: flat mode, the model's tensors re-pointed into one buffer per group;
* :mod:`~d2ema.averaging.swap`: the exception-safe exchange of EMA weights into a model and back;
* :mod:`~d2ema.averaging.offload`: an EMA kept off the accelerator, updated in the background;
* :mod:`~d2ema.averaging.health`: the NaN/Inf watch that never stalls the GPU;
* :mod:`~d2ema.averaging.dtensor`: the DTensor helpers the EMA needs under FSDP2.

Nothing here is needed by a user of :class:`~d2ema.EMA`; it is read by whoever maintains it.
"""
