"""Bird's-eye-view perception with a frozen multi-camera encoder and a feature upsampler.

``bev.geometry`` holds every camera / ego / BeV transform. The nuScenes data, encoder and heads
land with the BeV issues (see DESIGN.md in the shared folder). ``bev`` may import ``jafar``;
``jafar`` never imports it.
"""
