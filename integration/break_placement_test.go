package integration

import (
	"testing"
	"time"
)

// Placement while the preferred server is cut off from etcd (it still
// answers its peers' pings, and its lease lives on until its TTL): apps
// are placed on it by n1 and it never sees them. Every app must have
// exactly one owner within TTL + 1 s (+ slack), the checker must find no
// overlap, and once it heals nothing may overlap either.
func TestBreakPlacementOnAServerCutOffFromEtcd(t *testing.T) {
	for _, tc := range []struct {
		name string
		cut  func(p *proc, cut bool)
		// hold: keep the fault for this long and require ownership only
		// after it heals (a deaf server's keepalives still reach etcd: its
		// lease, and the keys placed on it, live on while it cannot act —
		// documented as "etcd unreachable", which passes).
		hold time.Duration
	}{
		{"partitioned", func(p *proc, cut bool) { p.partition(cut) }, 0},
		{"deaf (rx paused)", func(p *proc, cut bool) { p.pauseRx(cut) }, 2 * ttl},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, ttl)
			ps := []*proc{c.start("n1"), c.start("n2"), c.start("n3")}
			apps := c.register(12)
			tc.cut(ps[1], true)
			cutAt := time.Now()
			placed := map[string]int{}
			for _, app := range apps {
				addr, err := c.acquire(ps[0], app)
				if err != nil {
					t.Logf("acquire %d: %v", app, err)
					continue
				}
				for _, p := range ps {
					if p.public == addr {
						placed[p.id]++
					}
				}
			}
			t.Logf("placed while n2 is cut off: %v", placed)
			if tc.hold > 0 {
				_, err := c.check.waitOwned(apps, "n2", tc.hold)
				t.Logf("during %v of deafness: owned off n2: %v", tc.hold, err == nil)
				tc.cut(ps[1], false)
				took, err := c.check.waitOwned(apps, "", ttl+time.Second+slack)
				if err != nil {
					t.Fatalf("after healing: %v", err)
				}
				t.Logf("every app owned once %v after healing", took)
				c.assertVerdict()
				return
			}
			took, err := c.check.waitOwned(apps, "n2", ttl+time.Second+slack)
			if err != nil {
				tc.cut(ps[1], false)
				t.Fatal(err)
			}
			t.Logf("every app owned off n2 %v after the placements (%v after the cut)", took, time.Since(cutAt))
			tc.cut(ps[1], false)
			if _, err := c.check.waitOwned(apps, "", ttl+slack); err != nil {
				t.Fatal(err)
			}
			waitEnds(t, c, "n2")
			c.assertVerdict()
		})
	}
}
