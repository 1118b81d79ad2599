package integration

import (
	"context"
	"testing"
	"time"
)

// BenchmarkGracefulHandover: three servers, one app, 1,000 workers
// watching etcd; the owner drains (Node.Drain: it leaves the membership
// and hands its apps to their successors); time from the drain's start
// until the last worker points at the new owner, also as a multiple of a
// plain etcd put's median measured in the same run. Run with
// -benchtime=20x.
func BenchmarkGracefulHandover(b *testing.B) {
	bc := newBenchCluster(b, 3)
	app := bc.registerOne("bench")
	f := startFleet(b, fleetConfig{N: 1000, App: oneApp("bench"), Etcd: bc.etcd, Servers: bc.addrs()})
	var samples []time.Duration
	for b.Loop() {
		owner := bc.settledOwner(app, f)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		start := time.Now()
		err := owner.Drain(ctx)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		next := bc.newOwner(app, owner)
		last, ok := f.followedAt(next.Addr(), 30*time.Second)
		if !ok {
			b.Fatal("workers did not follow")
		}
		samples = append(samples, last.Sub(start))
		ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
		owner.Close(ctx)
		cancel()
		bc.replace(owner, "127.0.0.1:0")
	}
	reportLatencies(b, samples)
	put := putP50(b, bc.etcd.Client(), 100)
	b.ReportMetric(ms(put), "put-p50-ms")
	b.ReportMetric(float64(percentile(samples, 0.5))/float64(put), "p50/put-p50")
	b.ReportMetric(float64(percentile(samples, 0.99))/float64(put), "p99/put-p50")
	fan := fanOutP50(b, bc.etcd.Client(), f.clients, 20)
	b.ReportMetric(ms(fan), "fanout-p50-ms")
	b.ReportMetric(float64(percentile(samples, 0.5))/float64(fan), "p50/fanout-p50")
}
