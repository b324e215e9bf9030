"""Process launch, rendezvous and the control channel between the controller and its workers."""
