"""The OMA: the control plane on the CloudStack side."""
