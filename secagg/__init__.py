"""secagg"""
