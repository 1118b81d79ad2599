package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/election/electiontest"
)

// foreign is the lease and owner record of a server of a newer baton,
// kept alive by the test; the checker sees its ownership as an interval
// of server "<group>-v2".
type foreign struct {
	g        *group
	app      int64
	token    int64
	lease    clientv3.LeaseID
	stop     chan struct{}
	stopped  chan struct{}
	mu       sync.Mutex
	ackedAt  int64 // CLOCK_MONOTONIC before sending the last acknowledged keepalive
	ackedTTL time.Duration
}

func startForeign(ctx context.Context, g *group, app int64, ttl time.Duration) (*foreign, error) {
	cli := g.r.etcd.Client()
	f := &foreign{g: g, app: app, stop: make(chan struct{}), stopped: make(chan struct{})}
	sent := electiontest.MonoNow()
	grant, err := cli.Grant(ctx, int64(ttl/time.Second))
	if err != nil {
		return nil, err
	}
	f.lease, f.ackedAt, f.ackedTTL = grant.ID, sent, time.Duration(grant.TTL)*time.Second
	rec := map[string]any{
		"version":  2,
		"serverId": g.name + "-v2",
		"protocols": map[string]any{
			"HTTP": map[string]any{"address": freeAddr(g.r.t)}, // nothing answers there
			"GRPC": map[string]any{"address": freeAddr(g.r.t)},
		},
		"ttlMillis":  ttl.Milliseconds(),
		"acquiredAt": time.Now().UTC(),
		"epoch":      map[string]any{"term": 7, "lease": fmt.Sprintf("%x", int64(grant.ID))},
		"weight":     3,
	}
	val, _ := json.Marshal(rec)
	key := g.c.keys.Owner(app)
	txn, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(grant.ID))).Commit()
	if err != nil || !txn.Succeeded {
		cli.Revoke(context.Background(), grant.ID)
		return nil, fmt.Errorf("write a v2 owner record for new app %d: succeeded %v, %v", app, txn != nil && txn.Succeeded, err)
	}
	f.token = txn.Header.Revision
	g.c.check.add(nodeEvent{Event: "acquire", Server: g.name + "-v2", App: app, Token: f.token, MonoNs: electiontest.MonoNow()})
	go f.keepAlive(ttl)
	return f, nil
}

func (f *foreign) keepAlive(ttl time.Duration) {
	defer close(f.stopped)
	tick := time.NewTicker(ttl / 3)
	defer tick.Stop()
	for {
		select {
		case <-f.stop:
			return
		case <-tick.C:
		}
		sent := electiontest.MonoNow()
		ctx, cancel := context.WithTimeout(context.Background(), ttl/3)
		resp, err := f.g.r.etcd.Client().KeepAliveOnce(ctx, f.lease)
		cancel()
		if err == nil && resp.TTL > 0 {
			f.mu.Lock()
			f.ackedAt, f.ackedTTL = sent, time.Duration(resp.TTL)*time.Second
			f.mu.Unlock()
		}
	}
}

// end stops the keepalives and revokes the lease (or lets it expire),
// closes the foreign interval at the earliest instant the lease can have
// been gone (CLOCK_MONOTONIC), and returns that and the latest instant
// it will be gone.
func (f *foreign) end(revoke bool) (int64, time.Time) {
	close(f.stop)
	<-f.stopped
	f.mu.Lock()
	// The last acknowledged keepalive was processed after it was sent:
	// the lease lives at least its TTL from then.
	end := f.ackedAt + int64(f.ackedTTL)
	f.mu.Unlock()
	gone := time.Now().Add(f.ackedTTL)
	if revoke {
		at := electiontest.MonoNow()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := f.g.r.etcd.Client().Revoke(ctx, f.lease)
		cancel()
		if err == nil {
			end, gone = min(end, at), time.Now()
		}
	}
	f.g.c.check.add(nodeEvent{Event: "end", Server: f.g.name + "-v2", App: f.app, Token: f.token, MonoNs: end})
	return end, gone
}
