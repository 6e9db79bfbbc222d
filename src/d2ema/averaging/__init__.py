"""What `EMA` delegates to: how the averages are stored and updated.

* `state`: which tensors of a model are tracked, and their storage layout;
* `update`: the update kernels (one `Binding`
  per group of tensors);
* `flat`: flat mode, the model's tensors re-pointed into one buffer per group;
* `swap`: the exception-safe exchange of EMA weights into a model and back;
* `offload`: an EMA kept off the accelerator, updated in the background;
* `health`: the NaN/Inf watch that never stalls the GPU;
* `dtensor`: the DTensor helpers the EMA needs under FSDP2.

Nothing here is needed by a user of `EMA`; it is read by whoever maintains it.
"""
