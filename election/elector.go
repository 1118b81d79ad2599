package election

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/backoff"
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/keyspace"
)

// Elector runs the per-app election of one server on its coord.Session.
// It keeps a table of every app's owner key and displacement markers from
// one watch of both (keyspace.Keys.OwnershipRange), reports that watch's
// progress to the session's guard, runs this server's ownership callbacks, and takes over the apps
// it is successor of when their owner keys disappear. It is safe for
// concurrent use. Close hands everything over and stops it; the session
// stays the caller's.
type Elector struct {
	cfg     Config
	session *coord.Session
	cli     *clientv3.Client
	keys    keyspace.Keys
	members *coord.Members
	mutexes *mutexes
	slots   chan struct{} // ElectionConcurrency tokens
	logger  hclog.Logger
	metrics *metrics

	ctx     context.Context // ends at Close
	cancel  context.CancelFunc
	watchMu sync.Mutex     // held by a progress request, and to retire a watch generation
	watchMD *metadata.MD   // the open owner watch's stream metadata; nil while it restarts
	rewatch chan struct{}  // capacity 1: start the owner watch afresh
	loops   sync.WaitGroup // watch, epoch and takeover loops
	passOns sync.WaitGroup // keys being passed on (passOnIfUnwanted), also in loops
	calls   sync.WaitGroup // callback runners

	mu      sync.Mutex
	table   map[int64]ownerKey                   // every app's owner key, as the watch shows it
	markers map[int64]map[clientv3.LeaseID]int64 // app → displaced lease → the marker's ModRevision
	rev     int64                                // the table holds every change up to this revision
	// ownMarkers are markers bound to this server's lease, whose
	// ownerships have ended: to be deleted (app → lease → ModRevision).
	ownMarkers map[int64]map[clientv3.LeaseID]int64
	sweep      chan struct{}        // capacity 1: ownMarkers has work
	changed    chan struct{}        // closed and replaced when the table changes
	mine       map[int64]*ownership // this server's ownerships, pending or active
	active     int                  // how many of mine are active
	resigning  map[int64]time.Time  // apps this server gave up, until a new owner shows or the time passes
	owed       map[int64]int64      // stopped ownerships whose keys are still to be released (see release.go)
	// released holds, per app, the token of an ownership this server
	// stopped in order to release its key (Resign, HandOver, a drain, a
	// rebalancing move, a pass-on). That release's Txn may reach etcd at
	// any moment — after its answer was lost, after the resignation
	// period, after an etcd restart — and the server it names acts at
	// once, so the token is never owned again: only a new write gives the
	// app back (takeBack). Dropped when the table shows the key changed.
	released map[int64]int64
	flights  map[int64]*flight // elections in progress, one per app
	queues   map[int64]*callbackQueue
	known    map[int64]bool      // app ids seen in the registry
	unknown  map[int64]time.Time // app ids found unregistered, until when that is believed
	takeover takeoverQueue
	// unanswered is guarded by its own mutex: pings run without e.mu.
	unanswered unansweredPings
	draining   bool
	closed     bool
}

// ownerKey is one app's owner key as last seen.
type ownerKey struct {
	rec    coord.OwnerRecord // zero ServerID when the value was corrupt
	modRev int64
	lease  clientv3.LeaseID
}

// New starts an elector for the server whose session is given: it reads
// every owner key and starts the owner watch, attaches that watch to the
// session's guard, and starts following membership. It fails if etcd does
// not answer before ctx ends.
func New(ctx context.Context, session *coord.Session, cfg Config) (*Elector, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Registerer, cfg.ServerID)
	if err != nil {
		return nil, err
	}
	e := &Elector{
		cfg:        cfg,
		session:    session,
		cli:        session.Client(),
		keys:       keyspaceOf(session),
		logger:     cfg.Logger.Named("election").With("server_id", cfg.ServerID),
		metrics:    m,
		table:      map[int64]ownerKey{},
		markers:    map[int64]map[clientv3.LeaseID]int64{},
		ownMarkers: map[int64]map[clientv3.LeaseID]int64{},
		sweep:      make(chan struct{}, 1),
		changed:    make(chan struct{}),
		mine:       map[int64]*ownership{},
		resigning:  map[int64]time.Time{},
		owed:       map[int64]int64{},
		released:   map[int64]int64{},
		flights:    map[int64]*flight{},
		queues:     map[int64]*callbackQueue{},
		known:      map[int64]bool{},
		unknown:    map[int64]time.Time{},
	}
	e.slots = make(chan struct{}, cfg.ElectionConcurrency)
	e.takeover.init()
	e.members, err = coord.WatchMembers(ctx, e.cli, e.keys.Prefix(), cfg.Logger)
	if err != nil {
		m.unregister()
		return nil, err
	}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	e.mutexes = &mutexes{cli: e.cli, ctx: e.ctx, logger: e.logger}
	e.rewatch = make(chan struct{}, 1)
	w, err := e.openWatch(ctx, 1)
	if err != nil {
		e.cancel()
		e.members.Close()
		m.unregister()
		return nil, err
	}
	hooks.AttachWatch(e.session, e.requestProgress)
	e.loops.Go(func() { e.watchLoop(w) })
	e.loops.Go(e.epochLoop)
	e.loops.Go(e.membersLoop)
	e.loops.Go(e.markerLoop)
	if cfg.Rebalance {
		e.loops.Go(e.rebalanceLoop)
	}
	for range cfg.ElectionConcurrency {
		e.loops.Go(e.takeoverLoop)
	}
	return e, nil
}

// Members returns the live-server set the elector follows.
func (e *Elector) Members() *coord.Members {
	if e == nil {
		return nil
	}
	return e.members
}

// Session returns the session the elector runs on.
func (e *Elector) Session() *coord.Session {
	if e == nil {
		return nil
	}
	return e.session
}

// requestProgress asks etcd for a progress notification on the open owner
// watch's stream, bounded by the round's ctx: the stream is chosen by the
// metadata, so the request goes where the watch is even though ctx is the
// round's. While the watch is being restarted there is nothing to ask;
// the restart's read reports progress.
//
// clientv3 answers a request for a stream it does not have by opening
// that stream, with no watch on it, until the client closes. watchMu
// keeps requests out of a generation that watchLoop retires: none is in
// flight when it cancels the watch, and none follows. (A watch that etcd
// ends itself — a leader loss, a compaction — closes its stream before
// watchLoop hears of it; a request in that moment can still open one,
// at most one per generation, on the client's own Watcher so that a
// client wrapped by etcd's namespace package keeps working.)
func (e *Elector) requestProgress(ctx context.Context) error {
	e.watchMu.Lock()
	defer e.watchMu.Unlock()
	if e.watchMD == nil {
		return nil
	}
	return e.cli.RequestProgress(metadata.NewOutgoingContext(ctx, *e.watchMD))
}

// setWatchMD records the open generation's stream metadata, or (nil) that
// it is being retired; see requestProgress.
func (e *Elector) setWatchMD(md *metadata.MD) {
	e.watchMu.Lock()
	defer e.watchMu.Unlock()
	e.watchMD = md
}

// ServerID returns this server's id.
func (e *Elector) ServerID() string {
	if e == nil {
		return ""
	}
	return e.cfg.ServerID
}

// watchLoop follows the owner watch. A failed or closed watch (compaction,
// leader loss) is answered with a full re-read and a new watch. After each
// response is applied, the session is told how far the watch has got:
// that is step 2 of the guard, and it is only sound because every event is
// applied — depositions included — before the report.
//
// When the guard fires, the watch is also started afresh, on a gRPC stream
// of its own (a new metadata generation): a watch that silently stopped
// delivering would otherwise keep every round from confirming while the
// rounds' keepalives keep the lease — and with it this server's place as
// successor — alive.
func (e *Elector) watchLoop(w ownerWatch) {
	for gen := 2; ; gen++ {
	follow:
		for {
			select {
			case resp, ok := <-w.ch:
				if !ok || resp.Err() != nil {
					e.logger.Debug("owner watch broke, reading again", "error", resp.Err())
					break follow
				}
				e.observe(w.after(resp.Events))
				hooks.WatchCaughtUp(e.session, delivered(resp))
			case <-e.rewatch:
				e.logger.Info("guard unconfirmed: restarting the owner watch on a new stream")
				break follow
			case <-e.ctx.Done():
				w.cancel()
				return
			}
		}
		e.setWatchMD(nil)
		w.cancel()
		for {
			ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
			var err error
			w, err = e.openWatch(ctx, gen)
			cancel()
			if err == nil {
				break
			}
			e.logger.Debug("restarting the owner watch failed, retrying", "error", err)
			if backoff.Sleep(e.ctx, 200*time.Millisecond) != nil {
				return
			}
		}
	}
}

// delivered is the revision up to which a watch response proves the watch
// has delivered everything: the last event's for a response with events
// (etcd's catch-up of a watch that fell behind sends batches whose header
// is the store's current revision, not the batch's last), the header's for
// a progress notification (sent only to a watch that is caught up). etcd
// never splits one revision's events across responses.
func delivered(resp clientv3.WatchResponse) int64 {
	if n := len(resp.Events); n > 0 {
		return resp.Events[n-1].Kv.ModRevision
	}
	if resp.IsProgressNotify() {
		return resp.Header.Revision
	}
	return 0
}

// ownerWatch is one generation of the owner watch.
type ownerWatch struct {
	ch      clientv3.WatchChan
	cancel  context.CancelFunc
	readRev int64 // the table holds everything up to here
}

// after drops the events the table already holds from the read.
func (w ownerWatch) after(events []*clientv3.Event) []*clientv3.Event {
	for len(events) > 0 && events[0].Kv.ModRevision <= w.readRev {
		events = events[1:]
	}
	return events
}

// openWatch starts generation gen of the owner watch on a gRPC stream of
// its own (its metadata differs from every earlier generation's), waits
// until etcd has created it, and only then reads every owner key into the
// table. A watch created from the current revision is "synced" in etcd at
// once, so progress notifications answer it right away; one started from
// an older revision would wait for etcd's catch-up loop (up to 100 ms) —
// time in which this server would not see an app handed to it.
func (e *Elector) openWatch(ctx context.Context, gen int) (ownerWatch, error) {
	mdctx := metadata.AppendToOutgoingContext(clientv3.WithRequireLeader(e.ctx), "baton-owner-watch", strconv.Itoa(gen))
	wctx, cancel := context.WithCancel(mdctx)
	start, end := e.keys.OwnershipRange()
	wch := e.cli.Watch(wctx, start, clientv3.WithRange(end), clientv3.WithPrevKV(), clientv3.WithCreatedNotify())
	select {
	case resp, ok := <-wch:
		if !ok || resp.Err() != nil || !resp.Created {
			cancel()
			return ownerWatch{}, fmt.Errorf("election: watch owner keys: %v", resp.Err())
		}
	case <-ctx.Done():
		cancel()
		return ownerWatch{}, ctx.Err()
	}
	rev, err := e.reload(ctx)
	if err != nil {
		cancel()
		return ownerWatch{}, err
	}
	md, _ := metadata.FromOutgoingContext(wctx)
	e.setWatchMD(&md)
	return ownerWatch{ch: wch, cancel: cancel, readRev: rev}, nil
}

// reload replaces the table with a fresh read of owner keys and markers
// and reconciles: ownerships whose key changed are lost, keys that
// vanished are treated as deletions (successor takeover).
func (e *Elector) reload(ctx context.Context) (int64, error) {
	start, end := e.keys.OwnershipRange()
	resp, err := e.cli.Get(ctx, start, clientv3.WithRange(end))
	if err != nil {
		return 0, fmt.Errorf("election: read owner keys: %w", err)
	}
	fresh := make(map[int64]ownerKey, len(resp.Kvs))
	markers := map[int64]map[clientv3.LeaseID]int64{}
	for _, kv := range resp.Kvs {
		if app, lease, err := e.keys.ParseDisplacedMarker(string(kv.Key)); err == nil {
			if markers[app] == nil {
				markers[app] = map[clientv3.LeaseID]int64{}
			}
			markers[app][clientv3.LeaseID(lease)] = kv.ModRevision
			continue
		}
		app, err := e.keys.AppIDFromOwnerKey(string(kv.Key))
		if err != nil {
			continue
		}
		fresh[app] = e.decodeOwner(app, kv.Value, kv.ModRevision, kv.Lease)
	}
	e.mu.Lock()
	for app, old := range e.table {
		if _, ok := fresh[app]; !ok {
			e.deleted(app, old.rec.ServerID, resp.Header.Revision)
		}
	}
	for app, k := range fresh {
		if old, ok := e.table[app]; !ok || old.modRev != k.modRev {
			e.put(app, k)
		}
	}
	for app, leases := range e.markers {
		for lease := range leases {
			if _, ok := markers[app][lease]; !ok {
				e.markerGone(app, lease)
			}
		}
	}
	for app, leases := range markers {
		for lease, rev := range leases {
			e.markerPut(app, lease, rev)
		}
	}
	e.rev = max(e.rev, resp.Header.Revision)
	e.settle(nil)
	e.mu.Unlock()
	hooks.WatchCaughtUp(e.session, resp.Header.Revision)
	return resp.Header.Revision, nil
}

func (e *Elector) decodeOwner(app int64, val []byte, modRev, lease int64) ownerKey {
	rec, err := coord.DecodeOwnerRecord(val)
	if err != nil {
		e.logger.Warn("owner key holds a corrupt record; treating its owner as unknown", "app_id", app, "error", err)
		rec = coord.OwnerRecord{}
	}
	return ownerKey{rec: rec, modRev: modRev, lease: clientv3.LeaseID(lease)}
}

// observe applies watch events to the table and to this server's
// ownerships. Every event of the batch is applied before any ownership
// may start acting, so that a marker written in the same Txn as an owner
// key is seen together with it.
func (e *Elector) observe(events []*clientv3.Event) {
	if len(events) == 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	touched := make(map[int64]bool, len(events))
	for _, ev := range events {
		if app, lease, err := e.keys.ParseDisplacedMarker(string(ev.Kv.Key)); err == nil {
			touched[app] = true
			if ev.Type == clientv3.EventTypePut {
				e.markerPut(app, clientv3.LeaseID(lease), ev.Kv.ModRevision)
			} else {
				e.markerGone(app, clientv3.LeaseID(lease))
			}
			continue
		}
		app, err := e.keys.AppIDFromOwnerKey(string(ev.Kv.Key))
		if err != nil {
			continue // neither an owner key nor a marker (bad input under the prefix)
		}
		touched[app] = true
		switch ev.Type {
		case clientv3.EventTypePut:
			e.put(app, e.decodeOwner(app, ev.Kv.Value, ev.Kv.ModRevision, ev.Kv.Lease))
		case clientv3.EventTypeDelete:
			prev := ""
			if ev.PrevKv != nil {
				prev = e.decodeOwner(app, ev.PrevKv.Value, 0, 0).rec.ServerID
			} else if old, ok := e.table[app]; ok {
				prev = old.rec.ServerID
			}
			e.deleted(app, prev, ev.Kv.ModRevision)
		}
	}
	e.rev = max(e.rev, events[len(events)-1].Kv.ModRevision)
	e.settle(touched)
}

// settle runs after a batch of table changes to the apps in touched (nil:
// any app, after a reload or at a new epoch): pending ownerships that may
// now act start acting, markers of this server's ended ownerships are
// queued for deletion, and waiters are told. A batch costs in proportion
// to the apps it touched, not to all this server holds. Called with e.mu
// held.
func (e *Elector) settle(touched map[int64]bool) {
	if touched == nil {
		for _, o := range e.mine {
			e.tryActivate(o)
		}
	}
	for app := range touched {
		e.tryActivate(e.mine[app])
	}
	e.queueOwnMarkers(touched)
	e.tableChangedLocked()
}

// put records a new owner key value. Called with e.mu held.
func (e *Elector) put(app int64, k ownerKey) {
	e.table[app] = k
	if e.history(app, k.modRev) {
		delete(e.takeover.orphans, app)
		return
	}
	if e.isMine(k) {
		if e.passOnIfUnwanted(app, k) {
			delete(e.takeover.orphans, app)
			if o := e.mine[app]; o != nil && o.token != k.modRev {
				e.lose(o, ReasonDeposed) // its key has been replaced
			}
			return
		}
		if k.rec.HandedOverFrom != 0 {
			delete(e.resigning, app) // handed back to this server
		}
		e.own(app, k.modRev, k.lease) // counts a takeover if it was an orphan
		delete(e.takeover.orphans, app)
		return
	}
	delete(e.takeover.orphans, app)
	delete(e.resigning, app) // someone else has it now
	if o := e.mine[app]; o != nil {
		e.metrics.deposed()
		e.lose(o, ReasonDeposed)
	}
}

// passOnIfUnwanted deals with an owner key naming this server that it
// will not own: one that appears while it is closing (handed to it by
// another server, or written by an election that was still in flight
// when the drain began), or one placed on it by another server (Place)
// for an app it is resigning from. Left alone such a key would name an
// owner that never acts; the app is passed on, to this server's own
// successor, and it reports true. A key handed back (HandedOverFrom set)
// ends the resignation instead. Called with e.mu held.
func (e *Elector) passOnIfUnwanted(app int64, k ownerKey) bool {
	resigning := e.resigningNow(app) && k.rec.HandedOverFrom == 0
	if !e.draining && !e.closed && !resigning {
		return false
	}
	token := k.modRev
	e.released[app] = max(e.released[app], token)
	e.logger.Info("an owner key naming this server appeared while it closes or resigns the app; passing the app on", "app_id", app)
	e.loops.Add(1)
	e.passOns.Add(1)
	go func() {
		defer e.loops.Done()
		defer e.passOns.Done()
		if err := e.releaseOrOwe(e.ctx, map[int64]int64{app: token}); err != nil {
			e.logger.Warn("passing on a handed-over app failed; the lease's end will free it", "app_id", app, "error", err)
		}
	}()
	return true
}

// history reports whether a change of app's owner key at revision rev is
// older than what this server already knows of the key from an answer: a
// token it owns or released. A server learns its own writes from their
// answers before its watch shows them, and a watch that lags still shows
// the key's earlier history: the table follows it, but nothing else may —
// neither ownerships nor the memory of a release in flight. A change
// after the released token drops it: the release was made, or another
// write got there first. Called with e.mu held.
func (e *Elector) history(app, rev int64) bool {
	if o := e.mine[app]; o != nil && rev < o.token {
		return true
	}
	t, ok := e.released[app]
	switch {
	case !ok:
		return false
	case rev > t:
		delete(e.released, app)
		return false
	}
	return rev < t
}

// deleted records that app's owner key was deleted at revision rev;
// prevOwner is who held it. Called with e.mu held.
func (e *Elector) deleted(app int64, prevOwner string, rev int64) {
	delete(e.table, app)
	if e.history(app, rev) {
		return
	}
	if o := e.mine[app]; o != nil {
		reason := ReasonDeposed
		if errors.Is(e.session.Epoch().Err(), coord.ErrLeaseLost) {
			reason = ReasonLeaseLost
		}
		e.lose(o, reason)
	}
	e.considerTakeover(app, prevOwner)
}

// isMine reports whether an owner key names this server under its
// current lease. Called with e.mu held.
func (e *Elector) isMine(k ownerKey) bool {
	return k.rec.ServerID == e.cfg.ServerID && k.lease == e.session.Lease()
}

func (e *Elector) tableChangedLocked() {
	close(e.changed)
	e.changed = make(chan struct{})
}

// epochLoop settles the ownerships of every epoch that ends — their
// contexts were already cancelled with the epoch's, by construction — and
// when a new epoch starts takes back, with the same token, the apps whose
// keys are unchanged. Epochs that start and end between two wake-ups are
// settled too: every ownership's own epoch is checked, not only the one
// this loop waited on.
func (e *Elector) epochLoop() {
	ep := e.session.Epoch()
	for {
		select {
		case <-ep.Done():
		case <-e.ctx.Done():
			return
		}
		e.mu.Lock()
		for _, o := range e.mine {
			switch {
			case o.lease == ep.Lease() && errors.Is(ep.Err(), coord.ErrLeaseLost):
				e.lose(o, ReasonLeaseLost)
			case errors.Is(ep.Err(), coord.ErrSessionClosed):
				e.lose(o, ReasonClosed)
			case o.active && o.epoch.Err() != nil:
				e.deactivate(o, epochReason(o.epoch.Err()))
			}
		}
		if errors.Is(ep.Err(), coord.ErrUnconfirmed) {
			select {
			case e.rewatch <- struct{}{}:
			default:
			}
		}
		e.mu.Unlock()
		next, err := e.session.NextEpoch(e.ctx, ep)
		if err != nil {
			return
		}
		ep = next
		e.reclaim()
		e.reconsiderOrphans() // takeovers refused while unconfirmed
	}
}

// reclaim runs at the start of an epoch: every key that still names this
// server under the current lease is owned again. The table is current up
// to the confirming round's revision, so an unchanged key means nobody
// else owned the app meanwhile.
func (e *Elector) reclaim() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for app, o := range e.mine {
		if k, ok := e.table[app]; !ok || k.modRev != o.token || !e.isMine(k) {
			e.lose(o, ReasonDeposed)
		}
	}
	for app, k := range e.table {
		if e.isMine(k) {
			e.own(app, k.modRev, k.lease)
		}
	}
	e.settle(nil)
}

// Close hands every owned app to its successor and waits (until ctx ends)
// for the successors to own them, then ends every remaining ownership
// (OnLose with ReasonClosed), waits for all callbacks to return and stops
// every goroutine. With a ctx that has already ended it hands nothing
// over and writes nothing. The session is left open: close it afterwards
// to revoke the lease. Close is idempotent.
func (e *Elector) Close(ctx context.Context) error {
	if e == nil {
		return nil
	}
	e.mu.Lock()
	if e.closed || e.draining {
		e.mu.Unlock()
		return nil
	}
	e.draining = true
	e.mu.Unlock()

	// Stop being anyone's successor first, so that servers draining at
	// the same time do not hand their apps to each other. A ctx that has
	// already ended means there is no time for any of it.
	var err error
	if ctx.Err() == nil {
		e.leaveMembership(ctx)
		err = e.handOverAll(ctx)
	}

	e.cancel()
	e.loops.Wait()
	e.mutexes.close()
	hooks.DetachWatch(e.session)
	e.mu.Lock()
	e.closed = true
	for _, o := range e.mine {
		e.lose(o, ReasonClosed)
	}
	e.mu.Unlock()
	e.calls.Wait()
	e.members.Close()
	e.metrics.unregister()
	return err
}

// leaveMembership deletes this server's membership key if it is bound to
// the current lease. Failure only means the key lives until the lease is
// revoked.
func (e *Elector) leaveMembership(ctx context.Context) {
	key, err := e.keys.Server(e.cfg.ServerID)
	if err != nil {
		return
	}
	lease := e.session.Lease()
	_, err = e.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.LeaseValue(key), "=", lease),
	).Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		e.logger.Warn("could not leave membership before draining", "error", err)
		return
	}
	// Wait until our own view no longer lists us, so that successor
	// choices below exclude this server too.
	for {
		changed := e.members.Changed()
		if _, listed := e.members.Get(e.cfg.ServerID); !listed {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// keyspaceOf is the key layout of session's deployment; the session has
// validated its prefix.
func keyspaceOf(session *coord.Session) keyspace.Keys {
	keys, _ := keyspace.New(session.Prefix())
	return keys
}
