; netqueues test print: about 2 s on OctoPrint's virtual printer
;FLAVOR:Marlin
;TIME:2
G21 ; millimetres
G90 ; absolute positions
M82 ; absolute extrusion
G28 ; home
G92 E0
G1 X10 Y10 E0.0 F6000
G4 P250
G1 X15 Y15 E0.1 F6000
G4 P250
G1 X20 Y20 E0.2 F6000
G4 P250
G1 X25 Y25 E0.3 F6000
G4 P250
G1 X30 Y30 E0.4 F6000
G4 P250
G1 X35 Y35 E0.5 F6000
G4 P250
G1 X40 Y40 E0.6 F6000
G4 P250
G1 X45 Y10 E0.7 F6000
G4 P250
G1 Z10 F3000
M84 ; motors off
