package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/batonhq/baton/server/servertest"
)

// BenchmarkCrashFailover: three servers, one app, N workers; the owner
// crashes (no revoke); time from the crash until the last worker points at
// the new owner. baton's workers watch etcd; the baseline is the same
// workers polling with PowerJob's defaults. Run with -benchtime=20x.
func BenchmarkCrashFailover(b *testing.B) {
	for _, n := range []int{10, 1000} {
		var batonP50 time.Duration
		for _, mode := range []string{"baton", "baseline"} {
			b.Run(fmt.Sprintf("workers=%d/%s", n, mode), func(b *testing.B) {
				samples := crashTrials(b, n, mode == "baton")
				reportLatencies(b, samples)
				if mode == "baton" {
					batonP50 = percentile(samples, 0.5)
				} else if batonP50 > 0 {
					b.ReportMetric(float64(batonP50)/float64(percentile(samples, 0.5)), "baton/baseline-p50")
				}
			})
		}
	}
}

func crashTrials(b *testing.B, n int, withEtcd bool) []time.Duration {
	bc := newBenchCluster(b, 3)
	app := bc.registerOne("bench")
	fc := fleetConfig{N: n, App: oneApp("bench"), Servers: bc.addrs(), Stagger: true}
	if withEtcd {
		fc.Etcd = bc.etcd
	}
	// Polling workers know the three original addresses; the server
	// started to replace each crashed one listens where it did.
	f := startFleet(b, fc)
	var samples []time.Duration
	for b.Loop() {
		owner := bc.settledOwner(app, f)
		start := time.Now()
		servertest.Crash(owner)
		next := bc.newOwner(app, owner)
		last, ok := f.followedAt(next.Addr(), 30*time.Second)
		if !ok {
			b.Fatal("workers did not follow")
		}
		samples = append(samples, last.Sub(start))
		bc.replace(owner, owner.Addr())
	}
	return samples
}
