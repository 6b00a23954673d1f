"""Every number of the paper (OLMo-7B, pre-anneal checkpoint) that the report compares ours with. Nothing else."""

CHANCE = 9.5                   # mean rank of a guess among 20 candidates (Sec. 3)

# Table 2: row -> (first-hop fact, first-hop impl, second-hop fact, second-hop impl) mean ranks
TABLE2 = {"None": (0.00, 0.00, 0.00, 1.80), "Early": (5.10, 8.40, 0.95, 1.85), "Late": (0.00, 0.00, 0.10, 6.30),
          "All": (9.20, 9.25, 9.10, 9.50), "Early (pre)": (0.00, 6.50, 0.00, 0.50),
          "Late (pre)": (0.00, 0.10, 0.00, 6.60)}

# Table 3: weights -> mean ranks on (Impl F', Impl F, F')
TABLE3_COLS = ("Impl F'", "Impl F", "F'")
TABLE3 = {"W_F'": (9.13, 8.55, 0.00), "W_graft": (1.13, 3.30, 0.10), "W~_graft": (8.38, 0.43, 0.32)}
