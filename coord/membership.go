package coord

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/backoff"
	"github.com/batonhq/baton/internal/keyspace"
)

// ErrServerIDTaken: another live lease holds the server id.
var ErrServerIDTaken = errors.New("coord: server id registered by another live server")

// MembershipOnLease returns an OnLease callback for a SessionConfig that
// writes rec as server rec.ServerID's membership key under prefix ("" means
// DefaultPrefix), bound to each new lease. If
// the key is held by another lease — a second process with the same id,
// or this process's previous incarnation whose lease has not expired yet —
// the callback fails with ErrServerIDTaken, and the session retries until
// that lease is gone: two live servers never share an id.
func MembershipOnLease(cli *clientv3.Client, prefix string, rec ServerRecord) (func(context.Context, clientv3.LeaseID) error, error) {
	keys, err := keyspace.New(prefix)
	if err != nil {
		return nil, err
	}
	key, err := keys.Server(rec.ServerID)
	if err != nil {
		return nil, err
	}
	val, err := rec.Encode()
	if err != nil {
		return nil, fmt.Errorf("coord: server record: %w", err)
	}
	return func(ctx context.Context, lease clientv3.LeaseID) error {
		resp, err := cli.Txn(ctx).If(
			clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
		).Then(
			clientv3.OpPut(key, string(val), clientv3.WithLease(lease)),
		).Else(
			clientv3.OpGet(key),
		).Commit()
		if err != nil {
			return fmt.Errorf("coord: register server %q: %w", rec.ServerID, err)
		}
		if resp.Succeeded {
			return nil
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) > 0 && clientv3.LeaseID(kvs[0].Lease) == lease {
			return nil // already ours
		}
		holder := clientv3.LeaseID(0)
		if len(kvs) > 0 {
			holder = clientv3.LeaseID(kvs[0].Lease)
		}
		return fmt.Errorf("%w: %q is held by lease %x", ErrServerIDTaken, rec.ServerID, holder)
	}, nil
}

// Members is the live set of servers, kept current by one watch of
// {p}/servers/. It is safe for concurrent use; reads never block on etcd.
type Members struct {
	cli    *clientv3.Client
	keys   keyspace.Keys
	logger hclog.Logger

	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	stopWatch context.CancelFunc // the current watch's; only run touches it after start

	mu      sync.RWMutex
	servers map[string]ServerRecord
	created map[string]int64 // each server's membership key's CreateRevision
	changed chan struct{}    // closed and replaced at every change
	rev     int64            // the set holds every change up to this revision
	// placedAt is when the placement last changed as this process saw it:
	// a server joined (a new membership key, even under an id seen
	// before), left, or changed its placement weight.
	placedAt time.Time
}

// WatchMembers reads the live servers under prefix ("" means
// DefaultPrefix) and keeps watching them until Close. It fails if the
// first read does not succeed before ctx ends.
func WatchMembers(ctx context.Context, cli *clientv3.Client, prefix string, logger hclog.Logger) (*Members, error) {
	keys, err := keyspace.New(prefix)
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	m := &Members{cli: cli, keys: keys, logger: logger.Named("members"), changed: make(chan struct{})}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	wch, rev, err := m.sync(ctx)
	if err != nil {
		m.cancel()
		return nil, err
	}
	m.wg.Go(func() { m.run(wch, rev) })
	return m, nil
}

// sync starts a watch of the prefix from the current revision, waits until
// etcd has created it, then reads the set. A watch that starts at the
// current revision is "synced" in etcd and gets events as they happen; one
// started from an older revision waits for etcd's catch-up loop (every
// 100 ms). Events at or below the returned revision are in the read.
func (m *Members) sync(ctx context.Context) (clientv3.WatchChan, int64, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(m.ctx))
	wch := m.cli.Watch(wctx, m.keys.ServerPrefix(), clientv3.WithPrefix(), clientv3.WithCreatedNotify())
	select {
	case resp, ok := <-wch:
		if !ok || resp.Err() != nil || !resp.Created {
			cancel()
			return nil, 0, fmt.Errorf("coord: watch servers: %v", resp.Err())
		}
	case <-ctx.Done():
		cancel()
		return nil, 0, ctx.Err()
	}
	rev, err := m.load(ctx)
	if err != nil {
		cancel()
		return nil, 0, err
	}
	m.stopWatch = cancel
	return wch, rev, nil
}

// load replaces the set with what etcd has now and returns its revision.
func (m *Members) load(ctx context.Context) (int64, error) {
	resp, err := m.cli.Get(ctx, m.keys.ServerPrefix(), clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("coord: list servers: %w", err)
	}
	servers := make(map[string]ServerRecord, len(resp.Kvs))
	created := make(map[string]int64, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if rec, ok := m.decode(kv.Key, kv.Value); ok {
			servers[rec.ServerID] = rec
			created[rec.ServerID] = kv.CreateRevision
		}
	}
	m.mu.Lock()
	if m.placedAt.IsZero() || !samePlacement(m.servers, m.created, servers, created) {
		m.placedAt = time.Now()
	}
	m.servers, m.created = servers, created
	m.rev = max(m.rev, resp.Header.Revision)
	m.mu.Unlock()
	m.notify()
	return resp.Header.Revision, nil
}

// samePlacement reports whether two views of the set place apps alike and
// hold the same memberships: the same servers, each under the same
// membership key (CreateRevision) and with the same placement weight.
func samePlacement(a map[string]ServerRecord, aCreated map[string]int64, b map[string]ServerRecord, bCreated map[string]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for id, ra := range a {
		rb, ok := b[id]
		if !ok || aCreated[id] != bCreated[id] || ra.PlacementWeight() != rb.PlacementWeight() {
			return false
		}
	}
	return true
}

func (m *Members) decode(key, val []byte) (ServerRecord, bool) {
	id, err := m.keys.ServerIDFromKey(string(key))
	if err == nil {
		var rec ServerRecord
		rec, err = DecodeServerRecord(val)
		if err == nil && rec.ServerID == id {
			return rec, true
		}
		if err == nil {
			err = fmt.Errorf("record names server %q", rec.ServerID)
		}
	}
	m.logger.Warn("ignoring a malformed server record", "key", string(key), "error", err)
	return ServerRecord{}, false
}

// run follows the watch; a closed or failed watch (compaction, leader
// loss, disconnection) is answered with a new watch and a fresh read of
// the whole set, so nothing missed survives.
func (m *Members) run(wch clientv3.WatchChan, rev int64) {
	defer func() { m.stopWatch() }()
	for {
		for resp := range wch {
			if err := resp.Err(); err != nil {
				m.logger.Debug("server watch broke, reading again", "error", err)
				break
			}
			m.apply(resp.Events, rev)
		}
		m.stopWatch()
		for {
			if m.ctx.Err() != nil {
				return
			}
			ctx, cancel := context.WithTimeout(m.ctx, 5*time.Second)
			var err error
			wch, rev, err = m.sync(ctx)
			cancel()
			if err == nil {
				break
			}
			m.logger.Debug("reading servers failed, retrying", "error", err)
			if backoff.Sleep(m.ctx, 200*time.Millisecond) != nil {
				return
			}
		}
	}
}

func (m *Members) apply(events []*clientv3.Event, readRev int64) {
	if len(events) == 0 {
		return
	}
	m.mu.Lock()
	for _, ev := range events {
		if ev.Kv.ModRevision <= readRev {
			continue // already in the read
		}
		m.rev = max(m.rev, ev.Kv.ModRevision)
		switch ev.Type {
		case clientv3.EventTypePut:
			if rec, ok := m.decode(ev.Kv.Key, ev.Kv.Value); ok {
				old, listed := m.servers[rec.ServerID]
				if !listed || m.created[rec.ServerID] != ev.Kv.CreateRevision || old.PlacementWeight() != rec.PlacementWeight() {
					m.placedAt = time.Now()
				}
				m.servers[rec.ServerID] = rec
				m.created[rec.ServerID] = ev.Kv.CreateRevision
			}
		case clientv3.EventTypeDelete:
			if id, err := m.keys.ServerIDFromKey(string(ev.Kv.Key)); err == nil {
				if _, listed := m.servers[id]; listed {
					m.placedAt = time.Now()
				}
				delete(m.servers, id)
				delete(m.created, id)
			}
		}
	}
	m.mu.Unlock()
	m.notify()
}

func (m *Members) notify() {
	m.mu.Lock()
	defer m.mu.Unlock()
	close(m.changed)
	m.changed = make(chan struct{})
}

// Changed returns a channel that is closed at the next change of the set;
// any number of goroutines may wait on it. Take the channel before reading
// the set, so that no change can slip between the read and the wait.
func (m *Members) Changed() <-chan struct{} {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.changed
}

// Stable returns when the set last changed in a way that can move apps,
// as this process saw it — a server joined (a new membership, even under
// an id seen before), left, or changed its placement weight (a cordon
// too) — and the etcd revision up to which the set is known. Every
// server listed has been a member at least since then; the first read
// counts as a change. A rebalancer waits for the set to be stable.
func (m *Members) Stable() (since time.Time, rev int64) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.placedAt, m.rev
}

// Servers returns the live servers ordered by id.
func (m *Members) Servers() []ServerRecord {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]ServerRecord, 0, len(m.servers))
	for _, rec := range m.servers {
		out = append(out, rec)
	}
	slices.SortFunc(out, func(a, b ServerRecord) int { return strings.Compare(a.ServerID, b.ServerID) })
	return out
}

// Get returns the record of live server id.
func (m *Members) Get(id string) (ServerRecord, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	rec, ok := m.servers[id]
	return rec, ok
}

// Rank returns the live servers in the order Rank gives for app.
func (m *Members) Rank(appID int64) []ServerRecord {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]ServerRecord, 0, len(m.servers))
	for _, id := range RankWeighted(appID, Placement(slices.Collect(maps.Values(m.servers)), "")) {
		out = append(out, m.servers[id])
	}
	return out
}

// Placement lists servers with their placement weights, for
// RankWeighted, without the server exclude ("" excludes none).
func Placement(servers []ServerRecord, exclude string) []Weighted {
	out := make([]Weighted, 0, len(servers))
	for _, s := range servers {
		if s.ServerID != exclude {
			out = append(out, Weighted{ID: s.ServerID, Weight: s.PlacementWeight()})
		}
	}
	return out
}

// Successor returns the live server that should take app over, or false
// when no server is alive.
func (m *Members) Successor(appID int64) (ServerRecord, bool) {
	ranked := m.Rank(appID)
	if len(ranked) == 0 {
		return ServerRecord{}, false
	}
	return ranked[0], true
}

// Close stops the watch. It is idempotent.
func (m *Members) Close() {
	m.cancel()
	m.wg.Wait()
}
