"""Image guidance: ControlNet units (README "ControlNet").

- ``files``: the ControlNet folder, what each file is (family and kind read from the tensors);
- ``loading``: building a ControlNetModel from a folder or a single file, offline, and a small cache;
- ``preprocessors``: the modules (control-map detectors) A1111's extension names;
- ``units``: control maps, the UNet wrapper that adds residuals, the infotext;
- ``request``: the native ``controlnets`` field and its resolution into unit plans.
"""
