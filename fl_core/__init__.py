"""fl_core"""
