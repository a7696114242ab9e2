"""nuScenes data for the BeV tasks (through nuscenes-devkit)."""
