package coord

import (
	"crypto/sha256"
	"encoding/binary"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Rank orders server ids for app by rendezvous (highest random weight)
// hashing: the first is the app's successor, the one that takes the app
// over when its owner key disappears, and the one workers ask first. Every
// process computes the same order from the same set of ids, and removing a
// server moves only the apps it ranked first. The weight of a server for
// an app is the first 8 bytes, big-endian, of SHA-256(serverID, 0x00,
// decimal appID); ties (never seen in practice) go to the smaller id. The
// input slice is not modified.
func Rank(appID int64, serverIDs []string) []string {
	servers := make([]Weighted, len(serverIDs))
	for i, id := range serverIDs {
		servers[i] = Weighted{ID: id, Weight: 1} // equal weights: the hash's order
	}
	return RankWeighted(appID, servers)
}

// Successor returns the server id Rank puts first, or false when there
// are no servers.
func Successor(appID int64, serverIDs []string) (string, bool) {
	best, found := "", false
	var bestScore uint64
	for _, id := range serverIDs {
		w := weight(appID, id)
		if !found || w > bestScore || w == bestScore && id < best {
			best, bestScore, found = id, w, true
		}
	}
	return best, found
}

func weight(appID int64, serverID string) uint64 {
	h := sha256.New()
	h.Write([]byte(serverID))
	h.Write([]byte{0})
	h.Write(strconv.AppendInt(nil, appID, 10))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// Weighted is a server id with its placement weight: its share of apps is
// Weight divided by the sum of the weights. Weight 0 (a cordoned server)
// takes no app while any server of positive weight is in the set.
type Weighted struct {
	ID     string
	Weight float64
}

// RankWeighted orders servers for app by weighted rendezvous hashing: a
// server's score is -Weight/ln(u), where u in (0,1) comes from the same
// hash as Rank's, and the highest score comes first. With equal weights
// the order is exactly Rank's. A server of weight w ranks first for a
// share w/Σw of the apps, and adding, removing or re-weighting one server
// moves only apps to or from that server. Servers of weight 0 (or less,
// or NaN) come after all others, in Rank's order. The input slice is not
// modified.
func RankWeighted(appID int64, servers []Weighted) []string {
	type scored struct {
		id     string
		active bool
		score  float64
		hash   uint64
	}
	s := make([]scored, len(servers))
	for i, srv := range servers {
		h := weight(appID, srv.ID)
		// 53 bits map exactly onto a float64 in (0,1).
		u := (float64(h>>11) + 0.5) / (1 << 53)
		active := srv.Weight > 0
		s[i] = scored{id: srv.ID, active: active, hash: h}
		if active {
			s[i].score = -srv.Weight / math.Log(u)
		}
	}
	slices.SortFunc(s, func(a, b scored) int {
		switch {
		case a.active != b.active:
			if a.active {
				return -1
			}
			return 1
		case a.active && a.score != b.score:
			if a.score > b.score {
				return -1
			}
			return 1
		case a.hash != b.hash:
			if a.hash > b.hash {
				return -1
			}
			return 1
		}
		return strings.Compare(a.id, b.id)
	})
	out := make([]string, len(s))
	for i := range s {
		out[i] = s[i].id
	}
	return out
}
