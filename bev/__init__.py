"""Bird's-eye-view perception with a frozen multi-camera encoder and a feature upsampler.

Placeholder package: the nuScenes data, geometry, encoder and heads land with the BeV issues
(see DESIGN.md in the shared folder). It may import ``jafar``; ``jafar`` never imports it.
"""
