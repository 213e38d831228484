"""The VMA: the appliance next to vCenter."""
